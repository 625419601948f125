"""prepare_dataset on real PTB-XL files: counts, cache hits, keys, bad records, 500 Hz files."""

import csv
import json
import os
import shutil
import socket
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import wfdb
from scipy.signal import resample_poly

from leadtune.trainables.data.cache import (
    PreparedDataset,
    _shrink_npy,
    dataset_cache_dir,
    prepare_dataset,
    signals_fingerprint,
)
from leadtune.trainables.data.leads import LEADS
from leadtune.trainables.data.preprocess import PreprocessConfig
from leadtune.trainables.data.ptbxl import SUPERCLASSES, DatasetError, SplitConfig, load_database
from leadtune.trainables.data.records import read_record


def _copy_ptbxl(sample: Path, dest: Path, ids: list[int], records: bool = True) -> Path:
    """A PTB-XL-shaped folder holding the sample's rows (and record files) for `ids`."""
    (dest / "records100" / "00000").mkdir(parents=True)
    shutil.copy(sample / "scp_statements.csv", dest)
    with open(sample / "ptbxl_database.csv", newline="") as src:
        reader = csv.DictReader(src)
        rows = [row for row in reader if int(row["ecg_id"]) in ids]
        with open(dest / "ptbxl_database.csv", "w", newline="") as out:
            writer = csv.DictWriter(out, reader.fieldnames)
            writer.writeheader()
            writer.writerows(rows)
    for ecg_id in ids if records else []:
        for suffix in (".hea", ".dat"):
            name = f"records100/00000/{ecg_id:05d}_lr{suffix}"
            shutil.copy(sample / name, dest / name)
    return dest


def _expected_counts(sample: Path, limit: int) -> tuple[Counter, dict[str, Counter]]:
    """Split sizes and superclass counts of the first `limit` records, from the CSV by hand."""
    database = load_database(sample).iloc[:limit]
    split_of = {**dict.fromkeys(range(1, 9), "train"), 9: "val", 10: "test"}
    splits = Counter(split_of[f] for f in database["strat_fold"])
    classes = {s: Counter() for s in ("train", "val", "test")}
    for fold, labels in zip(database["strat_fold"], database["superclasses"]):
        classes[split_of[fold]].update(labels)
    return splits, classes


def test_prepare_counts_values_and_cache_hit(ptbxl_sample, tmp_path):
    dataset = prepare_dataset(ptbxl_sample, tmp_path, limit=60, progress=False)
    assert not dataset.cache_hit
    assert dataset.signals.shape == (60, 12, 1000) and dataset.signals.dtype == np.float32
    assert isinstance(dataset.signals, np.memmap) and not dataset.signals.flags.writeable
    assert list(dataset.ecg_ids) == list(range(1, 61))
    assert dataset.leads == LEADS and dataset.fs == 100

    splits, classes = _expected_counts(ptbxl_sample, 60)
    assert {s: len(dataset.indices(s)) for s in splits} == dict(splits)
    assert dataset.manifest["counts"] == {s: splits[s] for s in ("train", "val", "test")}
    for split, counts in classes.items():
        rows = dataset.indices(split)
        got = dict(zip(SUPERCLASSES, dataset.superclasses[rows].sum(axis=0).tolist()))
        assert got == {c: counts[c] for c in SUPERCLASSES}
        assert dataset.manifest["superclass_counts"][split] == got
    assert dataset.labelled.all()

    # each row is the record as read_record gives it, in LEADS order
    for row in (0, 17, 59):
        ecg_id = dataset.ecg_ids[row]
        record = read_record(ptbxl_sample / f"records100/00000/{ecg_id:05d}_lr")
        np.testing.assert_array_equal(dataset.signals[row], record.signal)
    assert dataset.fingerprint == signals_fingerprint(dataset.signals, dataset.ecg_ids)

    summary = dataset.summary()
    assert "train" in summary and str(dataset.path) in summary and "built in" in summary

    signals_file = dataset.path / "signals.npy"
    built_at = signals_file.stat().st_mtime_ns
    started = time.perf_counter()
    again = prepare_dataset(ptbxl_sample, tmp_path, limit=60, progress=False)
    assert time.perf_counter() - started < 1.0
    assert again.cache_hit and again.path == dataset.path
    assert again.fingerprint == dataset.fingerprint
    assert signals_file.stat().st_mtime_ns == built_at
    assert "cache hit" in again.summary()


def test_cache_key_follows_settings(ptbxl_sample, tmp_path):
    base = dataset_cache_dir(ptbxl_sample, tmp_path, limit=30)
    assert base == dataset_cache_dir(ptbxl_sample, tmp_path, PreprocessConfig(), limit=30)
    others = [
        dataset_cache_dir(ptbxl_sample, tmp_path, PreprocessConfig(zero_phase=True), limit=30),
        dataset_cache_dir(ptbxl_sample, tmp_path, PreprocessConfig(highpass_hz=None), limit=30),
        dataset_cache_dir(
            ptbxl_sample, tmp_path, splits=SplitConfig(test_folds=(10, 11)), limit=30
        ),
        dataset_cache_dir(ptbxl_sample, tmp_path, limit=31),
    ]
    assert len({base, *others}) == 5

    plain = prepare_dataset(ptbxl_sample, tmp_path, limit=30, progress=False)
    unfiltered = prepare_dataset(
        ptbxl_sample, tmp_path, PreprocessConfig(highpass_hz=None), limit=30, progress=False
    )
    assert not unfiltered.cache_hit and unfiltered.path != plain.path
    assert unfiltered.fingerprint != plain.fingerprint


def test_cache_root_from_environment(ptbxl_sample, tmp_path, monkeypatch):
    monkeypatch.setenv("LEADTUNE_CACHE", str(tmp_path / "env-cache"))
    dataset = prepare_dataset(ptbxl_sample, limit=5, progress=False)
    assert dataset.path.parent == tmp_path / "env-cache" / "datasets"


def test_folds_outside_the_splits_are_dropped(ptbxl_sample, tmp_path):
    splits = SplitConfig(train_folds=(1, 2, 3), val_folds=(9,), test_folds=())
    dataset = prepare_dataset(ptbxl_sample, tmp_path, splits=splits, limit=40, progress=False)
    database = load_database(ptbxl_sample)
    kept = database[database["strat_fold"].isin([1, 2, 3, 9])].iloc[:40]
    assert list(dataset.ecg_ids) == list(kept.index)
    assert len(dataset.indices("test")) == 0
    dropped = database[~database["strat_fold"].isin([1, 2, 3, 9])]["strat_fold"].value_counts()
    assert dataset.manifest["dropped_folds"] == {str(f): int(c) for f, c in dropped.items()}
    assert f"dropped (fold in no split): {dropped.sum()} records" in dataset.summary()


def test_bad_record_is_skipped_and_reported(ptbxl_sample, tmp_path):
    ids = list(range(1, 61))
    source = _copy_ptbxl(ptbxl_sample, tmp_path / "ptbxl", ids)
    dat = source / "records100/00000/00007_lr.dat"
    dat.write_bytes(dat.read_bytes()[:5000])
    dataset = prepare_dataset(source, tmp_path / "cache", limit=None, progress=False)
    assert len(dataset) == 59 and 7 not in dataset.ecg_ids
    assert np.load(dataset.path / "signals.npy", mmap_mode="r").shape == (59, 12, 1000)
    (skipped,) = dataset.manifest["skipped"]
    assert skipped["ecg_id"] == 7 and "truncated" in skipped["reason"]
    assert skipped["file"] == "records100/00000/00007_lr"
    assert "ecg_id 7:" in dataset.summary()
    # the rows after the bad one moved up, still matching their ids
    row = int(np.flatnonzero(dataset.ecg_ids == 8)[0])
    np.testing.assert_array_equal(
        dataset.signals[row], read_record(source / "records100/00000/00008_lr").signal
    )
    assert dataset.fingerprint == signals_fingerprint(dataset.signals, dataset.ecg_ids)


def test_too_many_bad_records_raise_and_leave_no_cache(ptbxl_sample, tmp_path):
    source = _copy_ptbxl(ptbxl_sample, tmp_path / "ptbxl", list(range(1, 61)))
    for ecg_id in (3, 4):
        (source / f"records100/00000/{ecg_id:05d}_lr.dat").unlink()
    with pytest.raises(DatasetError, match="--max-bad-fraction") as info:
        prepare_dataset(source, tmp_path / "cache", max_bad_fraction=0.02, progress=False)
    assert "2 of 60" in str(info.value) and "ecg_id 3" in str(info.value)
    assert list((tmp_path / "cache" / "datasets").iterdir()) == []
    # the same folder passes with a looser threshold
    dataset = prepare_dataset(source, tmp_path / "cache", max_bad_fraction=0.05, progress=False)
    assert len(dataset) == 58


def test_interrupted_build_leaves_nothing(ptbxl_sample, tmp_path, monkeypatch):
    import leadtune.trainables.data.cache as cache

    calls = []

    def failing_read(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return read_record(*args, **kwargs)

    monkeypatch.setattr(cache, "read_record", failing_read)
    final = dataset_cache_dir(ptbxl_sample, tmp_path, limit=10)
    stale = final.parent / f".{final.name}.tmp-{socket.gethostname()}-999999999"
    stale.mkdir(parents=True)  # left by a killed build (no such process)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(ptbxl_sample, tmp_path, limit=10, progress=False)
    assert list(final.parent.iterdir()) == []
    with pytest.raises(DatasetError, match="not a complete"):
        PreparedDataset.load(final)


def test_parallel_workers_give_the_same_cache(ptbxl_sample, tmp_path):
    one = prepare_dataset(ptbxl_sample, tmp_path / "a", limit=12, progress=False)
    two = prepare_dataset(ptbxl_sample, tmp_path / "b", limit=12, progress=False, workers=2)
    assert two.fingerprint == one.fingerprint


def test_shrink_npy(tmp_path):
    for rows, keep in ((10, 3), (1000, 999), (100_000, 9)):
        array = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)
        np.save(tmp_path / "a.npy", array)
        _shrink_npy(tmp_path / "a.npy", keep)
        np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), array[:keep])
        assert os.path.getsize(tmp_path / "a.npy") == 128 + keep * 8


def _write_500hz_copy(lr: Path, hr: Path) -> np.ndarray:
    """Write a 500 Hz WFDB record made from a real 100 Hz one; return the 100 Hz signal."""
    signal, fields = wfdb.rdsamp(str(lr))
    hr.parent.mkdir(parents=True, exist_ok=True)
    wfdb.wrsamp(
        hr.name,
        fs=500,
        units=["mV"] * 12,
        sig_name=fields["sig_name"],
        p_signal=resample_poly(signal, 5, 1, axis=0),
        fmt=["16"] * 12,
        adc_gain=[1000.0] * 12,
        baseline=[0] * 12,
        write_dir=str(hr.parent),
    )
    return signal


def test_records500_files(ptbxl_sample, tmp_path):
    # ids 1-2: both rates; 3: only 500 Hz; 4: neither; 5: only 100 Hz
    source = _copy_ptbxl(ptbxl_sample, tmp_path / "ptbxl", [1, 2, 3, 4, 5], records=False)
    table = (source / "ptbxl_database.csv").read_text()
    for ecg_id in (1, 2, 3, 4, 5):
        name = f"{ecg_id:05d}"
        table = table.replace(
            f"records100/00000/{name}_lr,,",
            f"records100/00000/{name}_lr,records500/00000/{name}_hr,",
        )
        lr = ptbxl_sample / f"records100/00000/{name}_lr"
        if ecg_id in (1, 2, 5):
            for suffix in (".hea", ".dat"):
                shutil.copy(lr.with_suffix(suffix), source / f"records100/00000/{name}_lr{suffix}")
        if ecg_id in (1, 2, 3):
            _write_500hz_copy(lr, source / f"records500/00000/{name}_hr")
    (source / "ptbxl_database.csv").write_text(table)
    assert load_database(source).loc[3, "filename_hr"] == "records500/00000/00003_hr"

    at_100 = prepare_dataset(source, tmp_path / "cache", max_bad_fraction=0.5, progress=False)
    assert list(at_100.ecg_ids) == [1, 2, 3, 5]
    assert [s["ecg_id"] for s in at_100.manifest["skipped"]] == [4]
    assert "00004_hr.hea" in at_100.manifest["skipped"][0]["reason"]
    # record 3 came from 500 Hz: close to what its original 100 Hz file gives
    original = read_record(ptbxl_sample / "records100/00000/00003_lr").signal
    assert np.abs(at_100.signals[2] - original).max() < 0.02
    # record 1 came from its 100 Hz file unchanged
    np.testing.assert_array_equal(
        at_100.signals[0], read_record(ptbxl_sample / "records100/00000/00001_lr").signal
    )

    at_500 = prepare_dataset(
        source, tmp_path / "cache", PreprocessConfig(fs=500), max_bad_fraction=0.5, progress=False
    )
    assert at_500.signals.shape == (3, 12, 5000) and list(at_500.ecg_ids) == [1, 2, 3]
    reasons = {s["ecg_id"]: s["reason"] for s in at_500.manifest["skipped"]}
    assert sorted(reasons) == [4, 5] and "not upsampled" in reasons[5]
    hr = read_record(source / "records500/00000/00002_hr", PreprocessConfig(fs=500))
    np.testing.assert_array_equal(at_500.signals[1], hr.signal)


def test_manifest_and_records_files(ptbxl_sample, tmp_path):
    dataset = prepare_dataset(ptbxl_sample, tmp_path, limit=20, progress=False)
    manifest = json.loads((dataset.path / "manifest.json").read_text())
    assert manifest["key"] == dataset.path.name
    assert manifest["settings"]["preprocess"] == PreprocessConfig().to_dict()
    assert manifest["shape"] == [20, 12, 1000]
    with open(dataset.path / "records.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["ecg_id", "split", "strat_fold", "labelled", *SUPERCLASSES]
    assert rows[0]["ecg_id"] == "1" and rows[0]["strat_fold"] == "3" and rows[0]["NORM"] == "1"
    assert not list(dataset.path.parent.glob(".*"))  # no temp dirs left
