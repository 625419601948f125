"""`leadtune label`: which lead is each channel of a WFDB record, and is any of them swapped?

The model sees only the waveforms, never the header's channel names. Each record is read with the
project's WFDB reader (any sampling rate, .dat or .mat, any channel-name spelling) and preprocessed
exactly like the training data (resampled to the model's rate, same high-pass). The channels are
labelled injectively by the Hungarian method over the K x M log-probabilities; a channel whose
header names a standard lead that differs from its assignment is a suspected swap.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from analysis import metrics
from analysis.model_source import LoadedModel


@dataclass
class ChannelLabel:
    """One input channel: what the header calls it and what the model says it is."""

    index: int
    name: str  # as in the header
    header_lead: str | None  # the standard lead the header name means, if any
    predicted: str  # most probable lead on its own (argmax)
    predicted_probability: float
    assigned: str  # Hungarian assignment (no lead used twice in the record)
    assigned_probability: float


@dataclass
class RecordLabels:
    record: str
    fs_original: int
    fs: int
    samples: int
    channels: list[ChannelLabel]
    probabilities: list[dict[str, float]]  # per channel, the probability of every lead
    suspected_swaps: list[dict[str, Any]]
    swap_pairs: list[list[str]]  # header leads exchanged pairwise (2-cycles of the assignment)
    notes: list[str] = field(default_factory=list)

    @property
    def assignment(self) -> list[str]:
        return [c.assigned for c in self.channels]

    def to_json(self) -> dict[str, Any]:
        return {
            "record": self.record,
            "channel_names": [c.name for c in self.channels],
            "assignment": self.assignment,
            "predicted": [c.predicted for c in self.channels],
            "probabilities": self.probabilities,
            "suspected_swaps": self.suspected_swaps,
            "swap_pairs": self.swap_pairs,
            "fs_original": self.fs_original,
            "fs": self.fs,
            "samples": self.samples,
            "channels": [asdict(c) for c in self.channels],
            "notes": self.notes,
        }


def windows(signal: np.ndarray, samples: int) -> np.ndarray:
    """(W, K, samples) non-overlapping windows of a (K, T) signal; one window if T <= samples."""
    total = signal.shape[1]
    if total <= samples:
        return signal[None]
    count = total // samples
    return np.stack([signal[:, i * samples : (i + 1) * samples] for i in range(count)])


def suspected_swaps(
    names: list[str], header_leads: list[str | None], assigned: list[str]
) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """Channels whose header names a standard lead other than their assignment, and 2-cycles.

    Channels without a standard header name cannot contradict the header and are never flagged.
    """
    swaps = [
        {"channel": i, "name": name, "header_lead": lead, "assigned": got}
        for i, (name, lead, got) in enumerate(zip(names, header_leads, assigned))
        if lead is not None and lead != got
    ]
    by_header = {s["header_lead"]: s["assigned"] for s in swaps}
    pairs = sorted(
        {tuple(sorted((a, b))) for a, b in by_header.items() if by_header.get(b) == a and a != b}
    )
    return swaps, [list(p) for p in pairs]


def label_signal(
    loaded: LoadedModel, signal: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(log-probabilities (K, M), argmax (K,), Hungarian (K,), notes) for one (K, T) signal.

    A record longer than the 10 s the model was trained on is cut into 10 s windows whose
    log-probabilities are averaged (the average is renormalised).
    """
    from analysis.evaluate import predict

    notes = []
    parts = windows(signal, loaded.samples)
    if signal.shape[1] < loaded.samples:
        notes.append(
            f"record is {signal.shape[1] / loaded.fs:.1f} s long, shorter than the 10 s the model "
            "was trained on; labels may be less reliable"
        )
    elif len(parts) > 1:
        notes.append(
            f"record cut into {len(parts)} windows of 10 s (remainder dropped); "
            "their log-probabilities are averaged"
        )
    log_probs = predict(loaded.model, np.ascontiguousarray(parts, dtype=np.float32))
    mean = metrics.log_softmax(log_probs.mean(axis=0))
    return mean, metrics.argmax_assign(mean), metrics.hungarian_assign(mean), notes


def label_record(path: str | Path, loaded: LoadedModel) -> RecordLabels:
    """Read, preprocess and label one record; RecordError/ValueError for unusable input."""
    from trainables.data.preprocess import PreprocessConfig
    from trainables.data.records import RecordError, read_record

    preprocess = PreprocessConfig(**loaded.preprocess)
    n_labels = len(loaded.leads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-standard channels are kept on purpose
        record = read_record(path, preprocess, keep_nonstandard=True)
    signal, names, header_leads = record.signal, list(record.channel_names), list(record.leads)
    notes = []
    if len(names) > n_labels:
        # More channels than lead labels (e.g. extra Frank leads): keep the standard ones the
        # model knows. Header names only choose the channels here; they never enter prediction.
        keep = [i for i, lead in enumerate(header_leads) if lead in loaded.leads]
        dropped = [names[i] for i in range(len(names)) if i not in keep]
        if len(keep) > n_labels or not keep:
            raise RecordError(
                f"{record.path}: {len(names)} channels but the model knows {n_labels} leads; "
                "remove the extra channels from the record"
            )
        signal = signal[keep]
        names = [names[i] for i in keep]
        header_leads = [header_leads[i] for i in keep]
        notes.append(f"ignored channel(s) {', '.join(dropped)}: more channels than lead labels")
    log_probs, argmax, hungarian, window_notes = label_signal(loaded, signal)
    probs = np.exp(log_probs)
    leads = loaded.leads
    channels = [
        ChannelLabel(
            index=i,
            name=names[i],
            header_lead=header_leads[i],
            predicted=leads[argmax[i]],
            predicted_probability=float(probs[i, argmax[i]]),
            assigned=leads[hungarian[i]],
            assigned_probability=float(probs[i, hungarian[i]]),
        )
        for i in range(len(names))
    ]
    swaps, pairs = suspected_swaps(names, header_leads, [c.assigned for c in channels])
    return RecordLabels(
        record=str(record.path),
        fs_original=record.fs_original,
        fs=record.fs,
        samples=int(signal.shape[1]),
        channels=channels,
        probabilities=[{lead: round(float(p), 6) for lead, p in zip(leads, row)} for row in probs],
        suspected_swaps=swaps,
        swap_pairs=pairs,
        notes=notes + window_notes,
    )


def find_records(folder: Path) -> list[Path]:
    """Every WFDB header under a folder, recursively, in sorted order."""
    return sorted(p for p in Path(folder).rglob("*.hea") if p.is_file())


def format_record(result: RecordLabels) -> str:
    """A readable table for one record."""
    lines = [
        f"{result.record}  ({len(result.channels)} channels, {result.fs_original} Hz read, "
        f"{result.fs} Hz model input)",
        f"  {'ch':>2}  {'header':<8} {'predicted':<9} {'p':>6}   {'assigned':<8} {'p':>6}",
    ]
    for c in result.channels:
        flag = (
            "  <- header says " + (c.header_lead or "")
            if c.header_lead
            not in (
                None,
                c.assigned,
            )
            else ""
        )
        lines.append(
            f"  {c.index:>2}  {c.name:<8} {c.predicted:<9} {c.predicted_probability:>6.3f}   "
            f"{c.assigned:<8} {c.assigned_probability:>6.3f}{flag}"
        )
    if result.swap_pairs:
        pairs = ", ".join(f"{a}<->{b}" for a, b in result.swap_pairs)
        lines.append(f"  suspected swap(s): {pairs}")
    elif result.suspected_swaps:
        lines.append(
            "  suspected mislabelled channel(s): "
            + ", ".join(f"{s['name']} looks like {s['assigned']}" for s in result.suspected_swaps)
        )
    else:
        lines.append("  no suspected swap: the assignment agrees with the header")
    for note in result.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


@dataclass
class LabelSummary:
    read: int = 0
    with_swaps: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    def format(self) -> str:
        lines = [
            f"summary: {self.read} record(s) read, {len(self.with_swaps)} with suspected swaps, "
            f"{len(self.failed)} failed"
        ]
        lines += [f"  swaps: {name}" for name in self.with_swaps]
        lines += [f"  failed: {name}: {reason}" for name, reason in self.failed]
        return "\n".join(lines)


def label_paths(
    paths: list[str | Path], loaded: LoadedModel, out=sys.stdout, as_json: bool = False
) -> tuple[list[RecordLabels], LabelSummary]:
    """Label records and folders. A single record that fails raises; with several records (or a
    folder) a failure is reported and skipped. Text goes to ``out`` as each record is done."""
    from trainables.data.records import RecordError

    targets: list[Path] = []
    folder_mode = len(paths) > 1
    for given in paths:
        path = Path(given)
        if path.is_dir():
            folder_mode = True
            found = find_records(path)
            if not found:
                raise FileNotFoundError(f"{path}: no WFDB header (*.hea) in this folder")
            targets.extend(found)
        else:
            targets.append(path)
    results, summary = [], LabelSummary()
    for target in targets:
        try:
            result = label_record(target, loaded)
        except (RecordError, ValueError, OSError) as exc:
            if not folder_mode:
                raise
            reason = " ".join(str(exc).split())
            summary.failed.append((str(target), reason))
            print(f"leadtune: error: {reason}", file=sys.stderr)
            continue
        summary.read += 1
        if result.suspected_swaps:
            summary.with_swaps.append(result.record)
        results.append(result)
        if not as_json:
            print(format_record(result) + "\n", file=out, flush=True)
    return results, summary
