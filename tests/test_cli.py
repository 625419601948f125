"""The `leadtune` command itself: help for every sub-command, `leadtune train` end to end, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from leadtune.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "ptbxl-sample"
TINY_TRAIN = [
    "--encoder", "cnn", "--context", "sab", "--d-model", "16", "--depth", "1", "--heads", "2",
    "--width", "0.125", "--batch-size", "8", "--max-train-records", "24",
    "--max-val-records", "8", "--num-threads", "1",
]  # fmt: skip


def test_every_sub_command_has_help_with_defaults():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"data", "models", "train", "search", "promote"} <= set(commands)
    for name, sub in commands.items():
        text = sub.format_help()
        assert "usage: leadtune " + name in text
    assert "default: 0.0007" in commands["train"].format_help()  # the reference learning rate


def test_leadtune_help_is_fast_to_import():
    # --help must not pull in torch, Ray or MLflow.
    code = (
        "import sys; from leadtune.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stderr


def test_train_runs_writes_checkpoints_and_resumes(tmp_path, capsys):
    cache = tmp_path / "cache"
    args = ["train", "--source", str(SAMPLE), "--cache-dir", str(cache), "--out", str(tmp_path)]
    assert main([*args, *TINY_TRAIN, "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "finished 2 epoch(s)" in out and "data fingerprint" in out
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert (tmp_path / "epoch_002" / "checkpoint.pt").exists()

    resumed = tmp_path / "resumed"
    code = main(
        [*args[:-1], str(resumed), *TINY_TRAIN, "--epochs", "3",
         "--resume", str(tmp_path / "epoch_002")]
    )  # fmt: skip
    assert code == 0
    assert [h["epoch"] for h in json.loads((resumed / "history.json").read_text())] == [3]


def test_train_reads_a_yaml_config_and_flags_override_it(tmp_path):
    from leadtune.trainables.commands import config_from_args

    config = tmp_path / "train.yaml"
    config.write_text("train:\n  lr: 0.002\n  encoder: gru\n  epochs: 4\n")
    args = build_parser().parse_args(["train", "--config", str(config), "--epochs", "7"])
    values = config_from_args(args)
    assert values == {"lr": 0.002, "encoder": "gru", "epochs": 7}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--heads", "3", "--d-model", "16"], "heads=3 does not divide d_model=16"),
        (["train", "--source", "/nonexistent/ptbxl"], "/nonexistent/ptbxl"),
        (["search", "--trials", "0"], "--trials must be at least 1"),
        (["search", "--space", "nope"], "unknown search space 'nope'"),
        (
            ["train", "--config", "/nonexistent.yaml"],
            "--config /nonexistent.yaml: no such file",
        ),
        (
            ["train", "--task", "diagnosis", "--encoder", "cnn"],
            "--encoder is a setting of the lead_id task",
        ),
        (["train", "--max-train-records", "0"], "max_train_records must be at least 1"),
        (["train", "--resume", "/nonexistent/epoch_001"], "no leadtune checkpoint"),
        (["search", "--study", "../escape"], "--study '../escape'"),
        (["search", "--register-name", "../x"], "--register-name '../x': use letters"),
        (["search", "--epochs", "3", "--set", "epochs=5"], "--epochs 3 and --set epochs=5"),
        (["search", "--objective", "params"], "--objective expects METRIC:min or METRIC:max"),
        (["search", "--objective", "val_nosuch:min"], "--objective val_nosuch is not a metric"),
        (["search", "--within", "params<500"], "--within expects METRIC<=VALUE"),
        (["search", "--metric", "val_nosuch"], "--metric val_nosuch is not a validation metric"),
        (["search", "--set", "lr=abc"], "setting lr must be a number"),
        (["search", "--address", "127.0.0.1:1"], "no Ray cluster answers"),
        (["label", "/nonexistent/record"], "no such record"),
        (["report", "--storage-path", "/nonexistent/runs"], "no leadtune search under"),
        (["evaluate", "--source", "/nonexistent/ptbxl"], "PTB-XL folder not found"),
        (["evaluate", "--suite", "nosuch"], "--suite nosuch: a lead_id model is evaluated by"),
        (
            ["evaluate", "--suite", "labelling", "--compare", "bundled"],
            "only its paper suite compares two models",
        ),
        (["bench", "--source", "/nonexistent/ptbxl"], "PTB-XL folder not found"),
    ],
)
def test_bad_input_is_a_one_line_error(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default folders (runs/...) land here, and must stay absent
    assert main(argv) == 2
    out, err = capsys.readouterr()
    err = err.strip().splitlines()
    assert len(err) == 1 and not out.strip(), (out, err)  # the error and nothing else
    assert err[-1].startswith("leadtune: error: ") and message in err[-1], err
    assert not (tmp_path / "runs").exists()  # nothing created before the error


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--limit", "0"], "argument --limit: must be at least 1"),
        (["evaluate", "--n-boot", "0"], "argument --n-boot: must be at least 1"),
        (["data", "prepare", "--source", ".", "--train-folds", "11"], "strat_folds are 1-10"),
        (["train", "--bogus", "1"], "unrecognized arguments: --bogus 1"),
    ],
)
def test_flag_errors_are_one_line_with_a_pointer_to_help(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    if exit_info.value.code != 2:
        raise AssertionError(exit_info.value.code)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert message in line and line.endswith("--help)"), line


def _all_parsers(parser, path=("leadtune",)):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_parsers(sub, (*path, name))
    yield " ".join(path), parser


def test_every_option_states_its_default_one_way():
    """Each option that takes a value has help, and a default it has is shown as
    "(default: X)": no other wording, no option whose default only the code knows."""
    import argparse
    import re

    from leadtune.cli import build_parser

    wrong = []
    for command, parser in _all_parsers(build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0 or action.help == argparse.SUPPRESS:
                continue
            flag = f"{command} {action.option_strings[-1]}"
            if action.help is None:
                wrong.append(f"{flag}: no help")
                continue
            shown = formatter._get_help_string(action)
            if re.search(r"; default|\(default [^:]|default is|defaults to|default=", shown):
                wrong.append(f"{flag}: {shown!r}")
            elif action.default is not None and not action.required and "(default: " not in shown:
                wrong.append(f"{flag}: default {action.default!r} not shown")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_model_by_flag_as_in_label_or_by_position(command, tmp_path, capsys):
    """evaluate and export take --model as label does; the positional form still works, and two
    different models are a one-line error before anything is read."""
    out = ["--out", str(tmp_path / "out")]
    missing = str(tmp_path / "no-such-model")
    assert main([command, "--model", missing, *out]) == 2
    by_flag = capsys.readouterr().err.strip()
    assert main([command, missing, *out]) == 2
    by_position = capsys.readouterr().err.strip()
    assert by_flag == by_position and "no-such-model" in by_flag
    assert main([command, missing, "--model", "models:/lead-id@champion", *out]) == 2
    err = capsys.readouterr().err.strip()
    assert "two models given" in err and len(err.splitlines()) == 1
