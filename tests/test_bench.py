"""`leadtune bench`: a quick smoke run of the real command on a tiny model, and its arithmetic."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from leadtune.bench import search, settings, speed, worker
from leadtune.cli import main
from leadtune.trainables.lead_id.train import LeadIdData

TINY = ["--d-model", "16", "--width", "0.125", "--depth", "1", "--heads", "2", "--samples", "200"]


def test_quick_bench_prints_the_table_and_the_two_lines(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "--quick", "--model", "reference", "--batch-size", "4",
                 "--source", "none", *TINY])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert re.fullmatch(r"train: \d+\.\d ECG/s", lines[-2]), lines[-2]
    assert re.fullmatch(r"infer: \d+\.\d ECG/s", lines[-1]), lines[-1]
    assert float(lines[-2].split()[1]) > 0 and float(lines[-1].split()[1]) > 0
    assert out.startswith("command: leadtune bench --model reference --quick --source none")
    assert "environment: " in out and "torch=" in out
    for name in settings.VARIANT_NAMES.values():
        assert name in out
    assert "fast path speed-up (medians): train vs plain default" in out
    # all three variants hold the same model
    assert re.search(r"47,004 parameters \(all variants: 47,004, 47,004, 47,004\)", out)


def test_speed_ratios_divide_fast_by_each_plain_variant() -> None:
    rows = [
        {"variant": "plain", "allocator": "default", "train_ecg_per_second": 2.0,
         "infer_ecg_per_second": 10.0},
        {"variant": "plain", "allocator": "tuned", "train_ecg_per_second": 4.0,
         "infer_ecg_per_second": 20.0},
        {"variant": "fast", "allocator": "tuned", "train_ecg_per_second": 7.0,
         "infer_ecg_per_second": 30.0},
    ]  # fmt: skip
    assert speed.speed_ratios(rows) == {
        "train_vs_plain_default": 3.5,
        "infer_vs_plain_default": 3.0,
        "train_vs_plain_tuned": 1.75,
        "infer_vs_plain_tuned": 1.5,
    }
    assert speed.speed_ratios(rows[1:]) == {
        "train_vs_plain_tuned": 1.75,
        "infer_vs_plain_tuned": 1.5,
    }


def test_epoch_estimate_adds_training_validation_and_data_time() -> None:
    data = LeadIdData(
        np.zeros((100, 12, 10), np.float32), np.zeros((20, 12, 10), np.float32), 100, "x"
    )
    measured = {"rows": [{"variant": "fast", "allocator": "tuned", "train_ecg_per_second": 10.0,
                          "infer_ecg_per_second": 40.0}]}  # fmt: skip
    (row,) = speed.estimate_epochs(measured, data, {"host_ecg_per_second": 1000.0})
    assert row["epoch_seconds"] == pytest.approx(100 / 10 + 20 / 40 + 100 / 1000)


def test_data_pipeline_figures_are_positive() -> None:
    rng = np.random.default_rng(0)
    data = LeadIdData(rng.normal(size=(50, 12, 100)).astype(np.float32),
                      np.zeros((5, 12, 100), np.float32), 100, "x")  # fmt: skip
    found = speed.measure_data_pipeline(data, settings.BenchSettings(batch_size=8), repeats=1)
    assert found["records"] == 50
    assert found["host_ecg_per_second"] > 0 and found["on_device_ecg_per_second"] > 0


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="unknown --model 'huge'"):
        settings.BenchSettings(models=("huge",)).validate()
    with pytest.raises(ValueError, match="--leads must be at most 12"):
        settings.BenchSettings(leads=13).validate()


def test_memory_probes_read_this_process() -> None:
    peak = worker.peak_resident_bytes()
    assert peak is None or peak > 10 * 2**20
    if os.path.isdir("/proc"):
        assert search.tree_pss_bytes(os.getpid()) > 10 * 2**20
