"""`leadtune data prepare|summary` end to end on the bundled sample."""

import argparse
import subprocess
import sys

import pytest

from leadtune.trainables.data import commands
from leadtune.trainables.data.ptbxl import DatasetError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leadtune")
    commands.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(*argv: str) -> int:
    args = _parser().parse_args(list(argv))
    return args.func(args)


@pytest.mark.parametrize(
    ("text", "folds"),
    [("1-8", tuple(range(1, 9))), ("1,2,3", (1, 2, 3)), ("1-3,7", (1, 2, 3, 7)), ("none", ())],
)
def test_parse_folds(text, folds):
    assert commands.parse_folds(text) == folds


def test_bad_folds_are_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["data", "prepare", "--source", "x", "--val-folds", "9-x"])
    assert "invalid folds '9-x'" in capsys.readouterr().err


def test_prepare_then_summary(ptbxl_sample, tmp_path, capsys):
    options = ["--source", str(ptbxl_sample), "--cache-dir", str(tmp_path), "--limit", "25"]
    assert _run("data", "summary", *options) == 1
    out = capsys.readouterr().out
    assert "no cache for these settings" in out
    assert f"leadtune data prepare --source {ptbxl_sample} --cache-dir {tmp_path} --limit 25" in out

    assert _run("data", "prepare", *options, "--quiet") == 0
    assert capsys.readouterr().out == ""
    assert _run("data", "summary", *options) == 0
    out = capsys.readouterr().out
    assert "25 records x 12 leads x 1000 samples at 100 Hz" in out
    assert "high-pass 0.5 Hz (order 4, causal)" in out

    # other settings are another cache
    assert _run("data", "summary", *options, "--highpass-hz", "0", "--test-folds", "none") == 1
    assert "--highpass-hz 0.0 --test-folds none" in capsys.readouterr().out


def test_errors_are_raised_for_the_cli_entry(tmp_path):
    with pytest.raises(DatasetError, match="folder not found"):
        _run("data", "prepare", "--source", str(tmp_path / "missing"), "--quiet")
    with pytest.raises(DatasetError, match="more than one split"):
        _run("data", "prepare", "--source", str(tmp_path), "--val-folds", "8")


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["data", "prepare", "--help"])
    out = capsys.readouterr().out
    for default in ("(default: 100)", "(default: 0.5)", "(default: 1-8)", "(default: 0.02)"):
        assert default in out


def test_module_imports_no_heavy_packages():
    code = (
        "import sys, leadtune.trainables.data.commands; "
        "print(sorted(m for m in ('numpy', 'pandas', 'wfdb', 'torch') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "[]", result.stderr
