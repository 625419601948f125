"""Mistakes caught before work starts, files that cannot run code, and locks a dead process
cannot leave behind. Real files throughout (WFDB records, checkpoints, an MLflow registry)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import wfdb
from delivery_fixtures import delivery_env, register_pickled_like_before

from leadtune.cli import main
from leadtune.trainables.data.records import RecordError, read_record
from leadtune.trainables.lead_id.models import kernels
from leadtune.trainables.lead_id.train import LeadIdData, train_lead_id
from leadtune.trainables.training import (
    CheckpointError,
    LocalReporter,
    NonFiniteError,
    load_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "ptbxl-sample"
RECORD = SAMPLE / "records100" / "00000" / "00001_lr"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return delivery_env(tmp_path_factory)


def one_line_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("leadtune")]
    assert len(err) == 1 and err[0].startswith("leadtune: error:"), err
    return err[0]


# -- no file a user passes runs code ---------------------------------------------------------


class _RunsCode:
    """What a crafted checkpoint hides: unpickling it would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_checkpoint(folder: Path, marker: Path, env) -> Path:
    state = torch.load(env.checkpoint / "checkpoint.pt", weights_only=True)
    state["config"]["payload"] = _RunsCode(marker)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "checkpoint.pt")
    return folder


@pytest.mark.parametrize("command", ["label", "evaluate", "export"])
def test_a_crafted_checkpoint_is_refused_without_running_anything(
    command, env, tmp_path, capsys
) -> None:
    marker = tmp_path / "code-ran"
    folder = crafted_checkpoint(tmp_path / "crafted", marker, env)
    argv = {
        "label": ["label", str(RECORD), "--model", str(folder)],
        "evaluate": ["evaluate", str(folder), "--out", str(tmp_path / "e")],
        "export": ["export", str(folder), "--out", str(tmp_path / "x")],
    }[command]
    message = one_line_error(argv, capsys)
    assert "not loaded" in message and "could run code" in message
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        load_checkpoint(folder)  # the resume path reads checkpoints the same way
    assert not marker.exists()


def test_a_registry_entry_pointing_at_a_crafted_checkpoint_runs_nothing(env, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    folder = crafted_checkpoint(tmp_path / "crafted", marker, env)
    version = register_pickled_like_before(env.tracking_uri, env.checkpoint, "old-style", folder)
    message = one_line_error(
        ["label", str(RECORD), "--model", f"models:/old-style/{version}",
         "--tracking-uri", env.tracking_uri],
        capsys,
    )  # fmt: skip
    assert "not loaded" in message
    assert not marker.exists()


def test_a_pickled_registry_version_is_refused_or_read_from_its_checkpoint(env, tmp_path, capsys):
    from leadtune.analysis.model_source import load_model

    version = register_pickled_like_before(env.tracking_uri, env.checkpoint, "legacy")
    loaded = load_model(f"models:/legacy/{version}", env.tracking_uri)  # its checkpoint is here
    assert any("before leadtune 0.2" in note for note in loaded.notes)
    moved = tmp_path / "moved"
    shutil.copytree(env.checkpoint, moved)
    gone = register_pickled_like_before(env.tracking_uri, moved, "legacy")
    shutil.rmtree(moved)
    message = one_line_error(
        ["evaluate", f"models:/legacy/{gone}", "--tracking-uri", env.tracking_uri], capsys
    )
    assert "re-register it with `leadtune promote" in message


# -- the non-finite guard --------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_data() -> LeadIdData:
    headers = sorted((SAMPLE / "records100").rglob("*_lr.hea"))[:24]
    signals = np.stack([wfdb.rdsamp(str(h.with_suffix("")))[0].T for h in headers])
    return LeadIdData(
        train=signals[:16, :, :250].astype(np.float32),
        val=signals[16:, :, :250].astype(np.float32),
        fs=100,
        fingerprint="small",
        train_ids=np.arange(1001, 1017),
        val_ids=np.arange(2001, 2009),
    )


TINY = dict(encoder="cnn", context="sab", d_model=16, depth=1, heads=2, batch_size=4, epochs=2,
            width=0.25, seed=0, device="cpu")  # fmt: skip


def test_a_non_finite_step_stops_with_epoch_step_and_ecg_ids(small_data, tmp_path) -> None:
    poisoned = LeadIdData(**{**small_data.__dict__, "train": small_data.train.copy()})
    poisoned.train[9, 3, 100] = np.inf  # ECG id 1010: an overflowed sample
    reporter = LocalReporter(tmp_path / "run")
    # Epoch 1 passes the poisoned record in some step of epoch 2 at the latest; either way the
    # error names where it happened, and the checkpoints written before stay loadable.
    with pytest.raises(NonFiniteError) as caught:
        train_lead_id({**TINY, "epochs": 3}, poisoned, reporter)
    message = str(caught.value)
    assert "\n" not in message and "epoch 1, step" in message and "1010" in message
    assert reporter.history == []  # it stopped in epoch 1: no checkpoint of a broken model
    skipping = LocalReporter(tmp_path / "skip")
    last = train_lead_id({**TINY, "skip_nonfinite_steps": True}, poisoned, skipping)
    assert last["skipped_steps"] == 1 and np.isfinite(last["train_loss"])
    assert load_checkpoint(skipping.history[-1]["checkpoint_dir"])["epoch"] == 2


def test_a_broken_model_is_reported_as_the_model_not_the_metrics(small_data, tmp_path) -> None:
    reporter = LocalReporter(tmp_path)
    data = LeadIdData(**{**small_data.__dict__, "val": small_data.val.copy()})
    data.val[2] = np.nan  # the model's output for ECG id 2003 becomes NaN
    with pytest.raises(NonFiniteError, match=r"model's outputs are not finite.*2003"):
        train_lead_id({**TINY, "epochs": 1}, data, reporter)


# -- kernels: a dead process's lock neither hangs nor goes unreported --------------------------


@pytest.fixture
def kernel_build(tmp_path, monkeypatch):
    """A copy of this machine's kernel build in a fresh extensions folder."""
    if kernels.load() is None:
        pytest.skip(f"fused kernels unavailable: {kernels.failure()}")
    name = kernels.build_name()
    source = kernels.build_dir(name)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    target = kernels.build_dir(name)
    target.mkdir(parents=True)
    monkeypatch.setattr(kernels, "_loaded", None)
    monkeypatch.setattr(kernels, "_failed", None)
    return source / f"{name}.so", target, name


def test_a_stale_pytorch_lock_does_not_block_loading_prebuilt_kernels(kernel_build) -> None:
    library, target, name = kernel_build
    shutil.copy(library, target / library.name)
    (target / "lock").write_text("")  # what a build killed by Ctrl-C leaves behind
    started = time.monotonic()
    assert kernels.load() is not None
    assert time.monotonic() - started < 30


def test_a_wait_for_another_build_is_bounded_and_says_what_it_waits_for(
    kernel_build, monkeypatch, capsys
) -> None:
    _, target, _ = kernel_build
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
         str(target / "leadtune-build.lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    monkeypatch.setattr(kernels, "BUILD_WAIT_S", 2.0)
    try:
        with pytest.warns(RuntimeWarning, match="gave up waiting after 2 s"):
            assert kernels.load() is None
        assert "another process building leadtune's CPU kernels" in capsys.readouterr().err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The holder died holding the lock: the kernel released it, nothing is left to wait for.
    from leadtune.trainables.runtime import file_lock

    with file_lock(target / "leadtune-build.lock", "", timeout=0):
        pass


# -- WFDB input: one line before any work ------------------------------------------------------


def write_record(folder: Path, name: str, signal: np.ndarray, fs: float = 500, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    wfdb.wrsamp(
        name, fs=fs, units=["mV"] * signal.shape[1],
        sig_name=names or [f"ch{i}" for i in range(signal.shape[1])],
        p_signal=signal, fmt=["16"] * signal.shape[1], write_dir=str(folder),
    )  # fmt: skip
    return folder / f"{name}.hea"


def edit_record_line(header: Path, fields: list[str]) -> None:
    lines = header.read_text().splitlines()
    lines[0] = " ".join(fields)
    header.write_text("\n".join(lines) + "\n")


def ecg(seconds: float = 10, fs: float = 500, channels: int = 12) -> np.ndarray:
    t = np.arange(int(seconds * fs)) / fs
    return np.stack([np.sin(2 * np.pi * (1 + c) * t) * 0.5 for c in range(channels)], axis=1)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("fs_zero", "sampling frequency '0'"),
        ("fs_missing", "no sampling frequency (wfdb would assume 250 Hz)"),
        ("all_zero", "all 12 channel(s) are flat"),
        ("channel_count", "says 13 channel(s) but 12 channel line(s) follow"),
    ],
)
def test_bad_wfdb_records_are_one_line_errors(case, expected, env, tmp_path, capsys) -> None:
    signal = np.zeros((5000, 12)) if case == "all_zero" else ecg()
    header = write_record(tmp_path, "rec", signal)
    fields = header.read_text().splitlines()[0].split()
    if case == "fs_zero":
        edit_record_line(header, [fields[0], fields[1], "0", *fields[3:]])
    elif case == "fs_missing":
        edit_record_line(header, fields[:2])
    elif case == "channel_count":
        edit_record_line(header, [fields[0], "13", *fields[2:]])
    with pytest.raises(RecordError) as caught:
        read_record(header, require_leads=False)
    assert expected in str(caught.value)
    message = one_line_error(["label", str(header), "--model", str(env.checkpoint)], capsys)
    assert expected in message


def test_a_folder_with_bad_records_labels_the_rest_and_keeps_them_in_json(env, tmp_path, capsys):
    import json

    folder = tmp_path / "records"
    folder.mkdir()
    shutil.copy(RECORD.with_suffix(".hea"), folder / "00001_lr.hea")
    shutil.copy(RECORD.with_suffix(".dat"), folder / "00001_lr.dat")
    zero = write_record(folder, "flat", np.zeros((5000, 12)))
    code = main(["label", str(folder), "--model", str(env.checkpoint), "--json",
                 "--csv", str(tmp_path / "out.csv")])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert code == 2  # a record could not be read
    good = [o for o in out if "error" not in o]
    bad = [o for o in out if "error" in o]
    assert len(good) == 1 and good[0]["schema"] == "leadtune.label/3"
    assert len(bad) == 1 and bad[0]["record"] == str(zero) and "flat" in bad[0]["error"]
    rows = (tmp_path / "out.csv").read_text().splitlines()
    assert len(rows) == 3 and "unreadable" in rows[2]


def test_data_prepare_judges_each_record_by_the_expected_length(tmp_path) -> None:
    """A short record first in the table does not make every good record 'wrong length'."""
    from leadtune.trainables.data.cache import prepare_dataset

    source = tmp_path / "ptbxl"
    shutil.copytree(SAMPLE, source, ignore=shutil.ignore_patterns("records500"))
    table = (source / "ptbxl_database.csv").read_text().splitlines()
    source_csv = source / "ptbxl_database.csv"
    source_csv.write_text("\n".join(table[:41]) + "\n")  # 40 records
    first = source / "records100" / "00000" / "00001_lr"
    short = wfdb.rdrecord(str(first)).p_signal[:700]
    write_record(first.parent, first.name, short, fs=100, names=wfdb.rdheader(str(first)).sig_name)
    dataset = prepare_dataset(source, cache_root=tmp_path / "cache", progress=False,
                              max_bad_fraction=0.1)  # fmt: skip
    assert len(dataset) == 39
    skipped = dataset.manifest["skipped"]
    assert [s["ecg_id"] for s in skipped] == [1] and "700 samples" in skipped[0]["reason"]


def test_max_bad_fraction_is_part_of_the_cache_key(tmp_path) -> None:
    from leadtune.trainables.data.cache import cache_key

    assert cache_key(SAMPLE, max_bad_fraction=0.02) != cache_key(SAMPLE, max_bad_fraction=0.6)


# -- settings caught before a search starts anything ------------------------------------------


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--set", "bogus_key=1"], "unknown training setting(s) bogus_key"),
        (["--set", "heads=3", "--set", "d_model=32"], "heads=3 does not divide d_model=32"),
        (["--gpus-per-trial", "2"], "each trial asks for 2 GPU, but this machine has 0 GPU"),
        (["--optuna-storage", "not-a-url"], "is not a database URL"),
        (["--tracking-uri", "http://127.0.0.1:1"], "does not answer"),
    ],
)
def test_bad_search_flags_are_one_line_errors_before_anything_starts(
    extra, expected, tmp_path, capsys
) -> None:
    if "--gpus-per-trial" in extra and torch.cuda.device_count():
        pytest.skip("this machine has GPUs")
    started = time.monotonic()
    message = one_line_error(
        ["search", "--space", "smoke", "--storage-path", str(tmp_path / "runs"), *extra], capsys
    )
    assert expected in message, message
    assert time.monotonic() - started < 30
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # no server was started
    assert not list((tmp_path / "runs").glob("*/search-*"))  # no search folder was made


@pytest.mark.parametrize("command", ["search", "train"])
def test_an_unwritable_output_folder_is_a_one_line_error(command, tmp_path, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    folder = str(blocker / "runs")  # cannot be created, even by root
    argv = {
        "search": ["search", "--space", "smoke", "--storage-path", folder],
        "train": ["train", "--out", folder, "--epochs", "1"],
    }[command]
    message = one_line_error(argv, capsys)
    assert folder in message and "cannot be written" in message and "a-file" in message


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("d_model", 10_000_000, "d_model must be in [1, 2048]"),
     ("depth", 100_000, "depth must be in [0, 48]"),
     ("ffn_mult", 10**6, "ffn_mult must be in [1, 16]"),
     ("d_model", 256, "the config describes a model of 4,356,580 values")],
    ids=["d_model 1e7", "depth 1e5", "ffn_mult 1e6", "d_model 256"],
)  # fmt: skip
def test_a_package_whose_config_claims_other_sizes_is_refused_before_allocating(
    key, value, message, tmp_path, capsys
):
    """A crafted config (the bundled model's weights, a size changed) is refused by the size
    bounds or by the shapes counted on the meta device, before the model is built: quickly and
    without the gigabytes the claimed sizes would need."""
    import json
    import resource

    from leadtune.bundled import model_dir

    folder = tmp_path / "crafted"
    shutil.copytree(model_dir(), folder)
    manifest = json.loads((folder / "leadtune-model.json").read_text())
    manifest["config"][key] = value
    (folder / "leadtune-model.json").write_text(json.dumps(manifest))
    assert main(["evaluate", str(folder), "--out", str(tmp_path / "warm")]) == 2  # imports paid
    capsys.readouterr()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    error = one_line_error(["label", str(RECORD), "--model", str(folder)], capsys)
    seconds = time.perf_counter() - started
    assert message in error and "weights do not match the recorded config" in error
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 500 and seconds < 30, (grown_mb, seconds)  # bounds, not a benchmark
