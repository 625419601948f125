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
            "config file /nonexistent.yaml does not exist",
        ),
    ],
)
def test_bad_input_is_a_one_line_error(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("leadtune: error: ") and message in err[-1], err
