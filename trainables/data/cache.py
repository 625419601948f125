"""Read a PTB-XL folder once into a memory-mapped cache of preprocessed signals.

`prepare_dataset` reads, preprocesses and stores every record of the chosen folds as one
float32 array (N, 12, T) in `signals.npy`, with `records.csv` (ids, splits, labels) and
`manifest.json` (settings, counts, skipped records, fingerprint). The cache directory is named
by a hash of everything that determines its content, is built in a temporary directory and
renamed into place, and counts as complete only once `manifest.json` exists, so a killed build
never leaves a half cache. A second call with the same settings loads it in about a second.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from leadtune.trainables.data.leads import LEADS
from leadtune.trainables.data.preprocess import PreprocessConfig
from leadtune.trainables.data.ptbxl import (
    SPLITS,
    SUPERCLASSES,
    DatasetError,
    SplitConfig,
    database_files,
    load_database,
    record_file,
)
from leadtune.trainables.data.records import RecordError, read_record

# Bump when the content of a cache changes for the same settings (reader or layout changes).
CACHE_VERSION = 2
# Peak |amplitude| after preprocessing above which a record is reported as holding an
# artefact. Surface ECG voltages stay well below it: QRS complexes reach about 3-5 mV (voltage
# criteria for ventricular hypertrophy start near 3.5 mV) and rarely 7 mV, so a 10 mV sample is a
# pacemaker spike, an electrode pop or a saturated amplifier, not heart activity.
AMPLITUDE_LIMIT_MV = 10.0
# Every PTB-XL record is 10 s long; a record of another length is skipped (and named).
RECORD_SECONDS = 10
SIGNALS_FILE = "signals.npy"
RECORDS_FILE = "records.csv"
MANIFEST_FILE = "manifest.json"
_SHOWN_REASONS = 3


def default_cache_root() -> Path:
    """$LEADTUNE_CACHE, or ~/.cache/leadtune."""
    return Path(os.environ.get("LEADTUNE_CACHE") or Path.home() / ".cache" / "leadtune")


def _file_stamp(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cache_key(
    source: Path,
    preprocess: PreprocessConfig = PreprocessConfig(),
    splits: SplitConfig = SplitConfig(),
    limit: int | None = None,
    max_bad_fraction: float = 0.02,
) -> str:
    """Short hash of everything that decides the cache content.

    Record files are not hashed (that would mean reading them all); the CSV stamps stand in
    for the dataset version.
    """
    database_csv, statements_csv = database_files(source)
    payload = {
        "source": str(Path(source).resolve()),
        "database_csv": _file_stamp(database_csv),
        "statements_csv": _file_stamp(statements_csv),
        "preprocess": preprocess.to_dict(),
        "splits": splits.to_dict(),
        "limit": limit,
        # A build refused at one threshold is no cache hit after one accepted at another.
        "max_bad_fraction": max_bad_fraction,
        "cache_version": CACHE_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def dataset_cache_dir(
    source: Path,
    cache_root: Path | None = None,
    preprocess: PreprocessConfig = PreprocessConfig(),
    splits: SplitConfig = SplitConfig(),
    limit: int | None = None,
    max_bad_fraction: float = 0.02,
) -> Path:
    """Where the cache for these settings lives (complete once it holds manifest.json)."""
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    return root / "datasets" / cache_key(source, preprocess, splits, limit, max_bad_fraction)


def format_folds(folds: Iterable[int]) -> str:
    """(1, 2, 3, 5) -> "1-3,5"."""
    folds = sorted(set(folds))
    if not folds:
        return "none"
    runs: list[list[int]] = [[folds[0], folds[0]]]
    for fold in folds[1:]:
        if fold == runs[-1][1] + 1:
            runs[-1][1] = fold
        else:
            runs.append([fold, fold])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def signals_fingerprint(signals: np.ndarray, ecg_ids: np.ndarray, chunk: int = 512) -> str:
    """sha256 of the float32 signal bytes in row order, then the ecg_ids as int64."""
    digest = hashlib.sha256()
    for start in range(0, len(signals), chunk):
        digest.update(np.ascontiguousarray(signals[start : start + chunk]).tobytes())
    digest.update(np.asarray(ecg_ids, dtype="<i8").tobytes())
    return digest.hexdigest()


class PreparedDataset:
    """A complete cache: signals (N, 12, T) float32 mV memory-mapped read-only, and labels."""

    def __init__(
        self,
        path: Path,
        signals: np.ndarray,
        records: pd.DataFrame,
        manifest: dict[str, Any],
        cache_hit: bool = False,
        seconds: float = 0.0,
    ) -> None:
        self.path = Path(path)
        self.signals = signals
        self.records = records
        self.manifest = manifest
        self.ecg_ids = records["ecg_id"].to_numpy(dtype=np.int64)
        self.splits = records["split"].to_numpy(dtype=str)
        self.strat_fold = records["strat_fold"].to_numpy(dtype=np.int64)
        self.labelled = records["labelled"].to_numpy(dtype=bool)
        self.superclasses = records[list(SUPERCLASSES)].to_numpy(dtype=bool)
        self.leads: tuple[str, ...] = tuple(manifest["leads"])
        self.fs: int = int(manifest["settings"]["preprocess"]["fs"])
        self.fingerprint: str = manifest["fingerprint"]
        self.cache_hit = cache_hit
        self.seconds = seconds  # time to load (cache hit) or build

    def __len__(self) -> int:
        return len(self.ecg_ids)

    def indices(self, split: str) -> np.ndarray:
        """Row indices of one split ("train", "val" or "test")."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return np.flatnonzero(self.splits == split)

    @classmethod
    def load(cls, path: Path) -> PreparedDataset:
        """Open a complete cache directory (as written by prepare_dataset)."""
        started = time.perf_counter()
        path = Path(path)
        manifest_file = path / MANIFEST_FILE
        if not manifest_file.is_file():
            raise DatasetError(
                f"{path}: not a complete leadtune dataset cache (no {MANIFEST_FILE}); "
                "build it with `leadtune data prepare --source DIR`"
            )
        try:
            manifest = json.loads(manifest_file.read_text())
            records = pd.read_csv(path / RECORDS_FILE)
            signals = np.load(path / SIGNALS_FILE, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise DatasetError(
                f"{path}: unreadable dataset cache ({exc}); delete the folder and run "
                "`leadtune data prepare` again"
            ) from exc
        if signals.shape[0] != len(records) or signals.shape[1] != len(LEADS):
            raise DatasetError(
                f"{path}: {SIGNALS_FILE} has shape {signals.shape} but {RECORDS_FILE} has "
                f"{len(records)} rows; delete the folder and run `leadtune data prepare` again"
            )
        return cls(path, signals, records, manifest, seconds=time.perf_counter() - started)

    def summary(self) -> str:
        """What is in the cache, per split, and what was skipped and why."""
        m = self.manifest
        pre = m["settings"]["preprocess"]
        how = (
            f"cache hit, loaded in {self.seconds:.2f} s"
            if self.cache_hit
            else f"built in {m['build_seconds']:.1f} s"
        )
        if pre["highpass_hz"] is None:
            filtering = "no high-pass"
        else:
            phase = "zero-phase" if pre["zero_phase"] else "causal"
            filtering = (
                f"high-pass {pre['highpass_hz']} Hz (order {pre['highpass_order']}, {phase})"
            )
        n, k, t = self.signals.shape
        lines = [
            f"PTB-XL cache: {self.path} ({how})",
            f"source: {m['source']}",
            f"signals: {n} records x {k} leads x {t} samples at {self.fs} Hz, float32 mV; "
            f"{filtering}",
            "",
            f"{'split':<6} {'folds':<8} {'records':>7} {'labelled':>8}"
            + "".join(f" {c:>5}" for c in SUPERCLASSES),
        ]
        folds = m["settings"]["splits"]
        for split in SPLITS:
            counts = m["superclass_counts"][split]
            lines.append(
                f"{split:<6} {format_folds(folds[f'{split}_folds']):<8} "
                f"{m['counts'][split]:>7} {m['labelled_counts'][split]:>8}"
                + "".join(f" {counts[c]:>5}" for c in SUPERCLASSES)
            )
        lines.append("(superclass counts are over labelled records; a record can have several)")
        dropped = m["dropped_folds"]
        if dropped:
            parts = ", ".join(f"fold {f}: {c}" for f, c in sorted(dropped.items()))
            lines.append(f"dropped (fold in no split): {sum(dropped.values())} records ({parts})")
        limit = m["settings"]["limit"]
        if limit is not None:
            lines.append(f"limit: first {limit} records of the chosen folds (by ecg_id)")
        skipped = m["skipped"]
        lines.append(f"skipped: {len(skipped)} unreadable records")
        for entry in skipped[:10]:
            lines.append(f"  ecg_id {entry['ecg_id']}: {entry['reason']}")
        if len(skipped) > 10:
            lines.append(f"  ... and {len(skipped) - 10} more (see {MANIFEST_FILE})")
        lines += self._quality_lines()
        lines.append(f"fingerprint: {self.fingerprint}")
        return "\n".join(lines)

    def _quality_lines(self) -> list[str]:
        quality = self.manifest.get("quality")
        if not quality:
            return []
        limit = quality["amplitude_limit_mv"]
        clip = self.manifest["settings"]["preprocess"].get("clip_mv")
        lines = [
            f"amplitude above {limit:g} mV (artefacts: surface ECG voltages stay below about "
            "5 mV; pacemaker spikes, electrode pops and saturation do not):"
        ]
        for split, found in quality["splits"].items():
            over = found["over_limit"]
            shown = ", ".join(f"{e['ecg_id']} ({e['peak_mv']:g} mV)" for e in over[:8])
            more = f", ... ({len(over) - 8} more in {MANIFEST_FILE})" if len(over) > 8 else ""
            flat = found["flat_lead"]
            lines.append(
                f"  {split:<6} {len(over):>4} record(s)"
                + (f": {shown}{more}" if over else "")
                + (f"; {len(flat)} with a flat lead" if flat else "")
            )
        lines.append(
            f"  (clipped to +-{clip:g} mV)"
            if clip
            else "  (kept as recorded, like the reference; rebuild with --clip-mv MV to clip)"
        )
        return lines


@dataclass(frozen=True)
class _Job:
    ecg_id: int
    header: Path | None
    file: str  # as named in ptbxl_database.csv, for reports
    missing_reason: str | None = None


def _read_job(job: _Job, preprocess: PreprocessConfig) -> tuple[_Job, np.ndarray | str]:
    """(job, (12, T) float32 in LEADS order) or (job, reason it cannot be used)."""
    if job.header is None:
        return job, job.missing_reason or "no signal file"
    try:
        record = read_record(job.header, preprocess)
    except RecordError as exc:
        return job, str(exc)
    absent = [lead for lead in LEADS if lead not in record.leads]
    if absent:
        return job, f"{job.header}: lacks lead(s) {', '.join(absent)}"
    if record.header_channels != len(LEADS):  # the README: a wrong channel count is skipped
        return job, (
            f"{job.header}: {record.header_channels} channels, not the {len(LEADS)} of a PTB-XL "
            "record"
        )
    order = [record.leads.index(lead) for lead in LEADS]
    expected = RECORD_SECONDS * preprocess.fs
    if record.signal.shape[1] != expected:
        return job, (
            f"{job.header}: {record.signal.shape[1]} samples at {preprocess.fs} Hz, not the "
            f"{expected} of a {RECORD_SECONDS} s PTB-XL record"
        )
    return job, record.signal[order]


def _read_all(
    jobs: list[_Job], preprocess: PreprocessConfig, workers: int
) -> Iterator[tuple[_Job, np.ndarray | str]]:
    read = partial(_read_job, preprocess=preprocess)
    if workers <= 1:
        yield from map(read, jobs)
        return
    # spawn, not fork: the caller may hold threads (Ray, torch) that fork would copy mid-lock.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context)
    try:
        yield from pool.map(read, jobs, chunksize=32)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _too_many_bad(
    source: Path, skipped: list[dict], total: int, max_bad_fraction: float, done: bool
) -> DatasetError:
    # Show each kind of failure once (the text after the file name), not 3 copies of one.
    examples: dict[str, str] = {}
    for entry in skipped:
        kind = entry["reason"].split(": ", 1)[-1]
        if kind not in examples and len(examples) < _SHOWN_REASONS:
            examples[kind] = f"ecg_id {entry['ecg_id']}: {entry['reason']}"
    ids = ", ".join(str(entry["ecg_id"]) for entry in skipped[:10])
    ids += ", ..." if len(skipped) > 10 else ""
    count = f"{len(skipped)}" if done else f"at least {len(skipped)}"
    return DatasetError(
        f"{source}: {count} of {total} records could not be read (ecg_id {ids}), more than "
        f"max_bad_fraction={max_bad_fraction} allows; {'; '.join(examples.values())}; fix or "
        "re-download the files, or raise the threshold with --max-bad-fraction"
    )


def _amplitude_report(signals_file: Path, ecg_ids: np.ndarray, splits: np.ndarray) -> dict:
    """Per split, the records whose peak |amplitude| exceeds AMPLITUDE_LIMIT_MV (artefacts a
    user may want to look at or clip) and those with a flat (constant) lead, with their ids."""
    signals = np.load(signals_file, mmap_mode="r")
    peaks = np.empty(len(ecg_ids), dtype=np.float32)
    flat = np.zeros(len(ecg_ids), dtype=bool)
    for start in range(0, len(ecg_ids), 512):
        chunk = np.asarray(signals[start : start + 512])
        peaks[start : start + len(chunk)] = np.abs(chunk).max(axis=(1, 2), initial=0.0)
        flat[start : start + len(chunk)] = (np.ptp(chunk, axis=2) == 0).any(axis=1)
    report: dict[str, Any] = {"amplitude_limit_mv": AMPLITUDE_LIMIT_MV, "splits": {}}
    for split in SPLITS:
        rows = np.flatnonzero(splits == split)
        over = rows[peaks[rows] > AMPLITUDE_LIMIT_MV]
        over = over[np.argsort(-peaks[over])]
        report["splits"][split] = {
            "over_limit": [
                {"ecg_id": int(ecg_ids[i]), "peak_mv": round(float(peaks[i]), 2)} for i in over
            ],
            "flat_lead": [int(ecg_ids[i]) for i in rows[flat[rows]]],
        }
    return report


def _shrink_npy(path: Path, rows: int) -> None:
    """Cut a C-order .npy file down to its first `rows` rows, in place where possible."""
    fmt = np.lib.format
    with open(path, "r+b") as f:
        version = fmt.read_magic(f)
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        old_header = f.tell()
    new_shape = (rows, *shape[1:])
    row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
    header = {"descr": fmt.dtype_to_descr(dtype), "fortran_order": fortran, "shape": new_shape}
    buffer = io.BytesIO()
    write_header = fmt.write_array_header_1_0 if version == (1, 0) else fmt.write_array_header_2_0
    write_header(buffer, header)
    if len(buffer.getvalue()) == old_header:
        with open(path, "r+b") as f:
            f.write(buffer.getvalue())
            f.truncate(old_header + rows * row_bytes)
        return
    # The header length changed (rare): copy the kept rows into a new file, chunk by chunk.
    old = np.load(path, mmap_mode="r")
    tmp = path.with_suffix(".shrink.npy")
    new = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=new_shape)
    for start in range(0, rows, 1024):
        new[start : start + 1024] = old[start : min(rows, start + 1024)]
    new.flush()
    del new, old
    os.replace(tmp, path)


def _remove_stale_builds(datasets_dir: Path, key: str) -> None:
    """Delete temp dirs of killed builds of this key on this host (other hosts may be live)."""
    prefix = f".{key}.tmp-{socket.gethostname()}-"
    for stale in datasets_dir.glob(f"{prefix}*"):
        try:
            pid = int(stale.name[len(prefix) :])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def _build(
    source: Path,
    build_dir: Path,
    key: str,
    preprocess: PreprocessConfig,
    splits: SplitConfig,
    max_bad_fraction: float,
    limit: int | None,
    progress: bool,
    workers: int,
) -> None:
    from tqdm import tqdm

    started = time.perf_counter()
    database = load_database(source)
    split_of_fold = splits.split_of_fold()
    split = database["strat_fold"].map(split_of_fold)
    dropped = database.loc[split.isna(), "strat_fold"].value_counts().sort_index()
    chosen = database[split.notna()].assign(split=split[split.notna()])
    if limit is not None:
        chosen = chosen.iloc[:limit]
    total = len(chosen)
    if total == 0:
        raise DatasetError(
            f"{source}: no records in folds {format_folds(split_of_fold)} "
            f"(limit={limit}); check --train-folds/--val-folds/--test-folds"
        )

    jobs = []
    for ecg_id, row in chosen.iterrows():
        lr, hr = row["filename_lr"], row["filename_hr"]
        header = record_file(source, lr, hr, preprocess.fs)
        reason = None
        if header is None and lr and (source / f"{lr}.hea").is_file():
            reason = (
                f"{source / lr}.hea: only a 100 Hz file, and the cache is at {preprocess.fs} Hz "
                "(100 Hz data is not upsampled); use --fs 100 or add records500/"
            )
        elif header is None:
            tried = " or ".join(f"{n}.hea" for n in (lr, hr) if n) or "no file name in the CSV"
            reason = f"{source}: no signal file found ({tried})"
        file = str(header.relative_to(source).with_suffix("")) if header else (lr or hr)
        jobs.append(_Job(int(ecg_id), header, file, reason))

    signals = None
    kept: list[int] = []
    skipped: list[dict[str, Any]] = []
    digest = hashlib.sha256()
    bar = tqdm(
        total=total,
        desc="reading PTB-XL",
        unit="rec",
        file=sys.stderr,
        disable=not progress or not sys.stderr.isatty(),  # no carriage-return line in a log file
    )
    with bar:
        for job, result in _read_all(jobs, preprocess, workers):
            bar.update()
            if isinstance(result, np.ndarray) and signals is None:
                signals = np.lib.format.open_memmap(
                    build_dir / SIGNALS_FILE,
                    mode="w+",
                    dtype=np.float32,
                    shape=(total, len(LEADS), RECORD_SECONDS * preprocess.fs),
                )
            if isinstance(result, str):
                skipped.append({"ecg_id": job.ecg_id, "file": job.file, "reason": result})
                if len(skipped) > max_bad_fraction * total:
                    raise _too_many_bad(source, skipped, total, max_bad_fraction, done=False)
                continue
            signals[len(kept)] = result
            digest.update(np.ascontiguousarray(result, dtype=np.float32).tobytes())
            kept.append(job.ecg_id)
    if signals is None:
        raise _too_many_bad(source, skipped, total, max_bad_fraction, done=True)
    n_samples = int(signals.shape[2])
    signals.flush()
    del signals
    if len(kept) < total:
        _shrink_npy(build_dir / SIGNALS_FILE, len(kept))
    ecg_ids = np.asarray(kept, dtype=np.int64)
    digest.update(ecg_ids.astype("<i8").tobytes())

    records = chosen.loc[ecg_ids]
    quality = _amplitude_report(build_dir / SIGNALS_FILE, ecg_ids, records["split"].to_numpy())
    table = pd.DataFrame(
        {
            "ecg_id": ecg_ids,
            "split": records["split"].to_numpy(),
            "strat_fold": records["strat_fold"].to_numpy(),
            "labelled": records["labelled"].astype(int).to_numpy(),
            **{c: [int(c in classes) for classes in records["superclasses"]] for c in SUPERCLASSES},
        }
    )
    table.to_csv(build_dir / RECORDS_FILE, index=False)

    labelled = table[table["labelled"] == 1]
    manifest = {
        "cache_version": CACHE_VERSION,
        "key": key,
        "source": str(source),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {
            "preprocess": preprocess.to_dict(),
            "splits": splits.to_dict(),
            "limit": limit,
            "max_bad_fraction": max_bad_fraction,
        },
        "leads": list(LEADS),
        "shape": [len(ecg_ids), len(LEADS), n_samples],
        "fingerprint": digest.hexdigest(),
        "counts": {s: int((table["split"] == s).sum()) for s in SPLITS},
        "labelled_counts": {s: int((labelled["split"] == s).sum()) for s in SPLITS},
        "superclass_counts": {
            s: {c: int(labelled.loc[labelled["split"] == s, c].sum()) for c in SUPERCLASSES}
            for s in SPLITS
        },
        "dropped_folds": {str(f): int(c) for f, c in dropped.items()},
        "skipped": skipped,
        "quality": quality,
        "build_seconds": round(time.perf_counter() - started, 2),
    }
    # manifest.json is written last and atomically: its presence marks a complete cache.
    part = build_dir / (MANIFEST_FILE + ".part")
    part.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(part, build_dir / MANIFEST_FILE)


def prepare_dataset(
    source: Path,
    cache_root: Path | None = None,
    preprocess: PreprocessConfig = PreprocessConfig(),
    splits: SplitConfig = SplitConfig(),
    max_bad_fraction: float = 0.02,
    limit: int | None = None,
    progress: bool = True,
    workers: int = 1,
) -> PreparedDataset:
    """The cached, preprocessed PTB-XL arrays for these settings, building them if needed.

    Unreadable records are skipped and listed in the manifest; more than `max_bad_fraction`
    of them raises DatasetError. Folds in none of the splits are left out.
    """
    started = time.perf_counter()
    source = Path(source).resolve()
    final_dir = dataset_cache_dir(source, cache_root, preprocess, splits, limit, max_bad_fraction)
    if (final_dir / MANIFEST_FILE).is_file():
        dataset = PreparedDataset.load(final_dir)
        dataset.cache_hit = True
        dataset.seconds = time.perf_counter() - started
        return dataset

    datasets_dir = final_dir.parent
    try:
        datasets_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(
            f"cannot create the dataset cache in {datasets_dir} ({exc.strerror or exc}); pass a "
            "writable --cache-dir (or set LEADTUNE_CACHE)"
        ) from None
    key = final_dir.name
    _remove_stale_builds(datasets_dir, key)
    build_dir = datasets_dir / f".{key}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(build_dir, ignore_errors=True)
    build_dir.mkdir()
    try:
        _build(
            source,
            build_dir,
            key,
            preprocess,
            splits,
            max_bad_fraction,
            limit,
            progress,
            workers,
        )
        if final_dir.exists() and not (final_dir / MANIFEST_FILE).is_file():
            shutil.rmtree(final_dir)  # not ours to keep: a cache without manifest is incomplete
        try:
            os.rename(build_dir, final_dir)
        except OSError:
            if not (final_dir / MANIFEST_FILE).is_file():
                raise
            # another process finished the same build first; its result is identical
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    dataset = PreparedDataset.load(final_dir)
    dataset.seconds = time.perf_counter() - started
    return dataset


# -- what a model trained on a dataset expects ---------------------------------------------------


def default_preprocess(fs: int) -> dict[str, Any]:
    from leadtune.trainables.data.preprocess import PreprocessConfig

    return PreprocessConfig(fs=fs).to_dict()


def find_preprocess(fingerprint: str, fs: int, cache_roots: list[Path] | None = None):
    """(preprocess settings, where they came from) for the training data with this fingerprint.

    The dataset cache manifest records the settings; it is looked up by fingerprint under the
    cache roots. Without one, the data layer's defaults at the model's rate are returned.
    """
    roots = [Path(r) for r in (cache_roots or [])] + [default_cache_root()]
    for root in roots:
        for manifest_file in sorted((root / "datasets").glob(f"*/{MANIFEST_FILE}")):
            try:
                manifest = json.loads(manifest_file.read_text())
            except (OSError, ValueError):
                continue
            if manifest.get("fingerprint") == fingerprint:
                return dict(manifest["settings"]["preprocess"]), f"dataset manifest {manifest_file}"
    return (
        default_preprocess(fs),
        "defaults of the data layer (PreprocessConfig); no dataset cache manifest with "
        f"fingerprint {fingerprint[:12]} was found",
    )
