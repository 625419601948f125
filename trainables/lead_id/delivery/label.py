"""`leadtune label`: which lead is each channel of a WFDB record, and are electrodes swapped?

The model sees only the waveforms. Channel names are never required: each record is read with
the project's WFDB reader (any sampling rate, .dat or .mat, any channel names or none, K <= 12
channels) and preprocessed exactly like the model's training data. The K channels are labelled
injectively by the Hungarian method over the K x 12 log-probabilities.

Where the header names standard leads, those names are only compared with the signal, as
hypotheses (see :mod:`leadtune.trainables.lead_id.reversals`):

- *identity*: the header is right;
- each *named electrode reversal* whose leads the header names (LA/RA, LA/LL, RA/LL, precordial
  neighbours): the channels are re-inverted and relabelled as the reversal says, and scored;
- *pair*: the best exchange of two named channels' labels, for a single exchange no name
  describes;
- *other*: the best labelling of all (Hungarian), for any other swap.

A hypothesis' score is the summed log-probability the model gives the named channels' labels
under it. A swap is suspected when some hypothesis beats the identity by more than that
hypothesis' own threshold (in nats; chosen on validation data so that correct records are rarely
flagged, and recorded with the model: a neighbour-precordial reversal moves few nats and needs a
low threshold, the free "other" labelling a high one, as it also gathers every lead the model is
unsure of). A named reversal is reported when it
scores within ``NAME_SLACK`` nats of the best hypothesis; otherwise the exchanged channels of
the best labelling are listed.

Output: a readable table, ``--json`` (schema ``leadtune.label/3``, below), and for folders a CSV
row per record (``--csv``). Exit status: 0 all records labelled and none flagged, 1 a swap is
suspected in at least one record, 2 at least one record could not be read.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from leadtune.analysis.model_source import LoadedModel
from leadtune.trainables.lead_id import metrics
from leadtune.trainables.lead_id.reversals import REVERSALS

SCHEMA = "leadtune.label/3"
# Nats per record by which the best hypothesis must beat the header's labelling to flag a swap,
# where the model records none (see the bundled model's card for the value chosen on validation).
DEFAULT_SWAP_THRESHOLD = 3.0
# A named reversal within this many nats of the best labelling is named.
NAME_SLACK = 1.0
# Hypotheses that name no reversal: the best single exchange, the best labelling of all.
UNNAMED = ("pair", "other")
EXIT_OK, EXIT_SWAP, EXIT_UNREADABLE, EXIT_NOT_JUDGED = 0, 1, 2, 4
# What a verdict needs. With one or two channels there is no set to compare them within (a lead
# is told from its neighbours; a one-channel "agrees" means nothing), and under 2.5 s (two to
# three heartbeats; the model was trained on 10 s) the evidence is too thin to clear the
# thresholds, which were chosen on 10 s records. Such records are labelled, but judged
# "cannot_judge" (exit status 4 when nothing worse happened). Under 1 s nothing is labelled.
MIN_CHANNELS_TO_JUDGE = 3
MIN_SECONDS_TO_JUDGE = 2.5
MIN_SECONDS_TO_LABEL = 1.0
CSV_FIELDS = (
    "record", "status", "reversal", "margin_nats", "channels", "header_names", "assigned",
    "probabilities", "notes", "error",
)  # fmt: skip


@dataclass
class ChannelLabel:
    """One input channel: what the header calls it and what the model says it is."""

    index: int  # position among the record's channels (as in the header)
    header_name: str
    header_lead: str | None  # the standard lead the header name means, if any
    assigned_lead: str  # Hungarian assignment (no lead used twice in the record)
    probability: float  # of the assigned lead
    margin: float  # probability of the assigned lead minus the best other lead's
    argmax_lead: str  # most probable lead on its own


@dataclass
class Verdict:
    status: str  # agrees | swap_suspected | no_header_leads | cannot_judge
    reason: str | None = None  # why a verdict could not be given (cannot_judge)
    # the hypothesis the margin is about ("other", "pair" or a reversal's key): for a suspected
    # swap the one reported, for "agrees" the one closest to its threshold
    hypothesis: str | None = None
    reversal: str | None = None  # a named reversal's key, e.g. "LA-RA"
    reversal_name: str | None = None
    margin_nats: float | None = None  # that hypothesis' score minus the header's (identity)
    threshold_nats: float | None = None  # that hypothesis' threshold
    flagged_by: list[str] = field(default_factory=list)  # hypotheses above their thresholds
    exchanged: list[list[str]] = field(default_factory=list)  # header lead -> assigned lead
    scores: dict[str, float] = field(default_factory=dict)  # every hypothesis tested


@dataclass
class RecordLabels:
    record: str
    fs_original: float
    fs: int
    samples: int
    channels: list[ChannelLabel]
    probabilities: list[dict[str, float]]  # per channel, the probability of every lead
    verdict: Verdict
    notes: list[str] = field(default_factory=list)

    @property
    def assignment(self) -> list[str]:
        return [c.assigned_lead for c in self.channels]

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "record": self.record,
            "fs_original": self.fs_original,
            "fs": self.fs,
            "samples": self.samples,
            "channels": [asdict(c) for c in self.channels],
            "probabilities": self.probabilities,
            "verdict": asdict(self.verdict),
            "notes": self.notes,
        }

    def csv_row(self) -> dict[str, Any]:
        v = self.verdict
        return {
            "record": self.record,
            "status": v.status,
            "reversal": v.reversal or "",
            "margin_nats": "" if v.margin_nats is None else f"{v.margin_nats:.3f}",
            "channels": len(self.channels),
            "header_names": " ".join(c.header_name or "-" for c in self.channels),
            "assigned": " ".join(self.assignment),
            "probabilities": " ".join(f"{c.probability:.3f}" for c in self.channels),
            "notes": " | ".join([*([v.reason] if v.reason else []), *self.notes]),
            "error": "",
        }


def windows(signal: np.ndarray, samples: int) -> np.ndarray:
    """(W, K, samples) non-overlapping windows of a (K, T) signal; one window if T <= samples."""
    total = signal.shape[1]
    if total <= samples:
        return signal[None]
    count = total // samples
    return np.stack([signal[:, i * samples : (i + 1) * samples] for i in range(count)])


def log_probabilities(loaded: LoadedModel, signal: np.ndarray) -> np.ndarray:
    """(K, M) log-probabilities of a (K, T) signal; a record longer than the 10 s the model was
    trained on is cut into 10 s windows whose log-probabilities are averaged (renormalised)."""
    from leadtune.trainables.lead_id.delivery.evaluation import predict

    parts = windows(signal, loaded.samples)
    log_probs = predict(loaded.model, np.ascontiguousarray(parts, dtype=np.float32))
    return metrics.log_softmax(log_probs.mean(axis=0))


def as_thresholds(value: float | Mapping[str, float]) -> dict[str, float]:
    """Thresholds by hypothesis key (``other`` and each reversal's key); one number applies to
    every hypothesis."""
    if isinstance(value, Mapping):
        found = {str(k): float(v) for k, v in value.items()}
        if "other" not in found:
            raise ValueError("swap thresholds need an 'other' entry (the default of every key)")
        return found
    return {"other": float(value)}


def threshold_of(thresholds: Mapping[str, float], key: str) -> float:
    return float(thresholds.get(key, thresholds["other"]))


def hypothesis_scores(
    loaded: LoadedModel,
    signal: np.ndarray,
    header_leads: list[str | None],
    log_probs: np.ndarray,
    assigned: np.ndarray,
    look_again: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, float] | None:
    """Every hypothesis' score (summed log-probability of the named channels' labels under it);
    None where the header names no standard lead or names one twice.

    A reversal that inverts leads is scored on the signal with those leads re-inverted, which
    needs the model again; ``look_again(signs)`` gives that table where it was computed in a
    batch beforehand (the labelling study), else the model runs here."""
    leads = list(loaded.leads)
    named = [i for i, lead in enumerate(header_leads) if lead in leads]
    names = [header_leads[i] for i in named]
    if not named or len(set(names)) != len(names):
        return None

    def score(table: np.ndarray, labels: list[str | None]) -> float:
        return float(sum(table[i, leads.index(labels[i])] for i in named))

    scores = {"identity": score(log_probs, header_leads)}
    scores["other"] = score(log_probs, [leads[j] for j in assigned])
    if len(named) >= 2:  # the best single exchange: labels a, b of channels i, j swapped
        columns = [leads.index(header_leads[i]) for i in named]
        own = log_probs[named][:, columns]  # [i, j]: channel i's log-probability of j's label
        mine = np.diag(own)
        gain = own + own.T - mine[:, None] - mine[None, :]
        scores["pair"] = scores["identity"] + float(gain[np.triu_indices(len(named), 1)].max())
    present = set(names)
    for reversal in REVERSALS:
        if not set(reversal.leads) <= present:
            continue
        labels, signs = reversal.undo(header_leads)
        if any(label not in leads for label in (labels[i] for i in named)):
            continue
        table = log_probs
        if (signs < 0).any():  # re-invert: the model must look again
            table = (
                look_again(signs)
                if look_again is not None
                else log_probabilities(loaded, signal * signs[:, None])
            )
        scores[reversal.key] = score(table, labels)
    return scores


def decide(
    scores: dict[str, float] | None,
    thresholds: Mapping[str, float],
    header_leads: list[str | None],
    best_labels: list[str],
) -> Verdict:
    """The verdict from the hypotheses' scores: a swap is suspected when some hypothesis beats
    the header's labelling (identity) by more than its own threshold (``flagged_by``). A named
    reversal is reported when it scores within ``NAME_SLACK`` nats of the best hypothesis;
    otherwise the exchanged channels of the best labelling are listed."""
    if scores is None:
        return Verdict(status="no_header_leads")
    margins = {
        key: value - scores["identity"] for key, value in scores.items() if key != "identity"
    }
    excess = {key: margin - threshold_of(thresholds, key) for key, margin in margins.items()}
    closest = max(excess, key=excess.get)
    if excess[closest] <= 0:
        return Verdict("agrees", hypothesis=closest, margin_nats=round(margins[closest], 3),
                       threshold_nats=threshold_of(thresholds, closest),
                       scores=_rounded(scores))  # fmt: skip
    flagged = sorted((key for key in excess if excess[key] > 0), key=excess.get, reverse=True)
    # which swap it is: the named reversal that fits as well as the best labelling of all (within
    # NAME_SLACK), else the best labelling, whose exchanged channels are listed
    best = max(margins, key=margins.get)
    fitting = [k for k in margins if k not in UNNAMED and margins[k] >= margins[best] - NAME_SLACK]
    hypothesis = max(fitting, key=margins.get) if fitting else best
    reversal = next((r for r in REVERSALS if r.key == hypothesis), None)
    exchanged = [
        [lead, label]
        for lead, label in zip(header_leads, best_labels)
        if lead is not None and lead != label
    ]
    return Verdict(
        status="swap_suspected",
        hypothesis=hypothesis,
        reversal=reversal.key if reversal else None,
        reversal_name=reversal.name if reversal else None,
        margin_nats=round(margins[hypothesis], 3),
        threshold_nats=threshold_of(thresholds, hypothesis),
        flagged_by=flagged,
        exchanged=exchanged,
        scores=_rounded(scores),
    )


def judge(
    loaded: LoadedModel,
    signal: np.ndarray,
    header_leads: list[str | None],
    log_probs: np.ndarray,
    assigned: np.ndarray,
    thresholds: float | Mapping[str, float],
    look_again: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Verdict:
    """Compare the header's labelling with the named reversals and the best labelling."""
    scores = hypothesis_scores(loaded, signal, header_leads, log_probs, assigned, look_again)
    best_labels = [loaded.leads[j] for j in assigned]
    return decide(scores, as_thresholds(thresholds), header_leads, best_labels)


def _rounded(scores: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in scores.items()}


def swap_thresholds(loaded: LoadedModel) -> dict[str, float]:
    """The model's thresholds by hypothesis (its card's, chosen on validation), else the
    default for every hypothesis."""
    labelling = loaded.card.get("labelling") or {}
    if labelling.get("swap_thresholds_nats"):
        return as_thresholds(labelling["swap_thresholds_nats"])
    value = labelling.get("swap_threshold_nats")
    return as_thresholds(float(value) if value is not None else DEFAULT_SWAP_THRESHOLD)


def label_signal(
    loaded: LoadedModel,
    signal: np.ndarray,
    header_names: list[str],
    header_leads: list[str | None],
    threshold: float | Mapping[str, float] | None = None,
) -> tuple[list[ChannelLabel], np.ndarray, Verdict]:
    """Label the channels of one (K, T) signal and judge its header; (channels, probabilities
    (K, M), verdict)."""
    leads = list(loaded.leads)
    if signal.shape[0] > len(leads):
        raise ValueError(
            f"{signal.shape[0]} channels but the model labels {len(leads)} leads; choose the "
            "ECG channels with --exclude NAME or INDEX (e.g. respiration or Frank leads)"
        )
    log_probs = log_probabilities(loaded, signal)
    probs = np.exp(log_probs)
    assigned = metrics.hungarian_assign(log_probs)
    channels = []
    for i, j in enumerate(assigned):
        others = np.delete(probs[i], j)
        channels.append(
            ChannelLabel(
                index=i,
                header_name=header_names[i],
                header_lead=header_leads[i],
                assigned_lead=leads[j],
                probability=float(probs[i, j]),
                margin=float(probs[i, j] - others.max()) if len(others) else 1.0,
                argmax_lead=leads[int(np.argmax(log_probs[i]))],
            )
        )
    verdict = judge(
        loaded, signal, header_leads, log_probs, assigned,
        swap_thresholds(loaded) if threshold is None else threshold,
    )  # fmt: skip
    return channels, probs, verdict


def label_record(
    path: str | Path, loaded: LoadedModel, exclude: tuple[str | int, ...] = ()
) -> RecordLabels:
    """Read, preprocess and label one record; RecordError/ValueError for unusable input."""
    from leadtune.trainables.data.preprocess import PreprocessConfig
    from leadtune.trainables.data.records import read_record

    preprocess = PreprocessConfig(**loaded.preprocess)
    record = read_record(path, preprocess, require_leads=False, exclude=exclude)
    seconds = record.signal.shape[1] / loaded.fs
    if seconds < MIN_SECONDS_TO_LABEL:
        raise ValueError(
            f"{path}: {record.signal.shape[1]} samples at {loaded.fs} Hz ({seconds:.2f} s) is too "
            f"short to label; leadtune label needs at least {MIN_SECONDS_TO_LABEL:g} s (and "
            f"{MIN_SECONDS_TO_JUDGE:g} s to judge the header)"
        )
    names = list(record.channel_names)
    header_leads = [lead if lead in loaded.leads else None for lead in record.leads]
    notes = []
    if record.signal.shape[1] < loaded.samples:
        notes.append(
            f"record is {record.signal.shape[1] / loaded.fs:.1f} s long, shorter than the 10 s "
            "the model was trained on; labels may be less reliable"
        )
    elif record.signal.shape[1] >= 2 * loaded.samples:
        notes.append(
            f"record cut into {record.signal.shape[1] // loaded.samples} windows of 10 s "
            "(remainder dropped); their log-probabilities are averaged"
        )
    flat = [names[i] or str(i) for i, is_flat in enumerate(record.flat) if is_flat]
    if flat:
        notes.append(
            f"flat channel(s) {', '.join(flat)}: no signal (a disconnected electrode; a flat II "
            "or III can also mean a right-leg electrode reversal); their labels mean little"
        )
    if len(set(filter(None, header_leads))) < len(list(filter(None, header_leads))):
        notes.append("the header names a lead twice: its names are not compared with the signal")
    if record.fs_original != loaded.fs:
        notes.append(f"resampled from {record.fs_original:g} Hz to the model's {loaded.fs} Hz")
    channels, probs, verdict = label_signal(loaded, record.signal, names, header_leads)
    unjudged = []
    if len(channels) < MIN_CHANNELS_TO_JUDGE:
        unjudged.append(
            f"{len(channels)} channel(s): a verdict needs at least {MIN_CHANNELS_TO_JUDGE}, "
            "since a lead is told apart from the others in the record"
        )
    if seconds < MIN_SECONDS_TO_JUDGE:
        unjudged.append(
            f"{seconds:.1f} s of signal: a verdict needs at least {MIN_SECONDS_TO_JUDGE:g} s"
        )
    if unjudged:
        verdict = Verdict("cannot_judge", reason="; ".join(unjudged), scores=verdict.scores)
    return RecordLabels(
        record=str(record.path),
        fs_original=record.fs_original,
        fs=record.fs,
        samples=int(record.signal.shape[1]),
        channels=channels,
        probabilities=[
            {lead: round(float(p), 6) for lead, p in zip(loaded.leads, row)} for row in probs
        ],
        verdict=verdict,
        notes=notes,
    )


def find_records(folder: Path) -> list[Path]:
    """Every WFDB header under a folder, recursively, in sorted order."""
    return sorted(p for p in Path(folder).rglob("*.hea") if p.is_file())


def format_record(result: RecordLabels) -> str:
    """A readable table for one record."""
    lines = [
        f"{result.record}  ({len(result.channels)} channels, {result.fs_original:g} Hz read, "
        f"{result.fs} Hz model input)",
        f"  {'ch':>2}  {'header':<8} {'lead':<5} {'p':>6} {'margin':>7}   (p: probability of "
        "the assigned lead; margin: p minus the next most probable lead's)",
    ]
    for c in result.channels:
        flag = (
            f"  <- header says {c.header_lead}"
            if c.header_lead not in (None, c.assigned_lead)
            else ""
        )
        lines.append(
            f"  {c.index:>2}  {c.header_name or '-':<8} {c.assigned_lead:<5} "
            f"{c.probability:>6.3f} {c.margin:>7.3f}{flag}"
        )
    v = result.verdict
    if v.status == "cannot_judge":
        lines.append(f"  CANNOT JUDGE the header: {v.reason} (labels shown, not compared)")
    elif v.status == "no_header_leads":
        lines.append("  the header names no standard leads (or names one twice): nothing compared")
    elif v.status == "agrees":
        gap = (
            f"{-v.margin_nats:.1f} nats below the header's labelling"
            if v.margin_nats < 0
            else f"{v.margin_nats:.1f} nats above it, under its threshold"
        )
        lines.append(
            "  the header agrees with the signal: no swap hypothesis beats it by its threshold "
            f"(the closest, {v.hypothesis}, scores {gap}; a swap needs "
            f"{v.threshold_nats:g} nats above)"
        )
    elif v.reversal:
        lines.append(
            f"  SWAP SUSPECTED: {v.reversal_name} (log-likelihood {v.margin_nats:.1f} nats above "
            "the header's labelling)"
        )
    else:
        pairs = ", ".join(f"{a}->{b}" for a, b in v.exchanged)
        lines.append(
            f"  SWAP SUSPECTED: channels labelled {pairs} (no named reversal fits; "
            f"{v.margin_nats:.1f} nats above the header's labelling)"
        )
    for note in result.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


@dataclass
class LabelSummary:
    read: int = 0
    with_swaps: list[str] = field(default_factory=list)
    not_judged: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    def format(self) -> str:
        lines = [
            f"summary: {self.read} record(s) labelled, {len(self.with_swaps)} with a suspected "
            f"swap, {len(self.not_judged)} could not be judged, {len(self.failed)} could not "
            "be read"
        ]
        lines += [f"  not judged: {name}" for name in self.not_judged]
        lines += [f"  swap: {name}" for name in self.with_swaps]
        lines += [f"  unreadable: {name}: {reason}" for name, reason in self.failed]
        return "\n".join(lines)

    @property
    def exit_code(self) -> int:
        if self.failed:
            return EXIT_UNREADABLE
        if self.with_swaps:
            return EXIT_SWAP
        return EXIT_NOT_JUDGED if self.not_judged else EXIT_OK


def label_paths(
    paths: list[str | Path],
    loaded: LoadedModel,
    out=sys.stdout,
    as_json: bool = False,
    exclude: tuple[str | int, ...] = (),
    csv_path: Path | None = None,
) -> tuple[list[RecordLabels], LabelSummary]:
    """Label records and folders. A single record that cannot be read raises; with several
    records (or a folder) it is reported, counted and skipped, and the rest are labelled.
    Text goes to ``out`` as each record is done; ``csv_path`` gets one row per record."""
    from tqdm import tqdm

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
    results, summary, rows = [], LabelSummary(), []
    progress = tqdm(
        targets, desc="labelling", unit="rec", file=sys.stderr,
        disable=not folder_mode or len(targets) < 5 or not sys.stderr.isatty(),
    )  # fmt: skip
    for target in progress:
        try:
            result = label_record(target, loaded, exclude)
        except Exception as exc:  # one bad record must not lose the others
            if not folder_mode:
                raise
            reason = " ".join(str(exc).split()) or type(exc).__name__
            summary.failed.append((str(target), reason))
            rows.append({**dict.fromkeys(CSV_FIELDS, ""), "record": str(target),
                         "status": "unreadable", "error": reason})  # fmt: skip
            if not as_json:
                print(f"leadtune: error: {reason}", file=sys.stderr)
            continue
        summary.read += 1
        if result.verdict.status == "swap_suspected":
            summary.with_swaps.append(result.record)
        elif result.verdict.status == "cannot_judge":
            summary.not_judged.append(result.record)
        results.append(result)
        rows.append(result.csv_row())
        if not as_json:
            print(format_record(result) + "\n", file=out, flush=True)
    if csv_path is not None:
        with open(csv_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
    return results, summary
