"""How well a lead-identification model labels recordings the way ``leadtune label`` sees them:
channels shuffled and renamed, fewer than 12 leads, electrode reversals, other devices.

``leadtune evaluate MODEL --suite labelling`` runs it on one split of a prepared PTB-XL dataset:

- **lead accuracy by K**: every record's channels in a random order (seeded), for the lead sets
  12, 8 (I, II, V1-V6), 6 limb, 6 precordial and 3 (I, II, V2); Hungarian labelling against
  the 12 candidates; ECG-level bootstrap intervals;
- **electrode reversals**: each named reversal applied to every record (the header keeps the
  standard names), judged by the labelling verdict; detection rate, the share named correctly,
  and the false-alarm rate on the untouched records; the threshold that would give at most 1 %
  false alarms on this split (choose it on validation, report it on test);
- **other recorders**: lead accuracy (K = 12) after gains, added noise, other front-end low-pass
  filters, and a 100 -> 500 -> 100 Hz round trip through the reader's resampling.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from leadtune.analysis.label import judge
from leadtune.trainables.data.leads import LEADS
from leadtune.trainables.lead_id import metrics
from leadtune.trainables.lead_id.config import LIMB, PRECORDIAL
from leadtune.trainables.lead_id.reversals import REVERSALS

LEAD_SETS: dict[str, tuple[str, ...]] = {
    "12": LEADS,
    "8 (I, II, V1-V6)": ("I", "II", *PRECORDIAL),
    "6 limb": LIMB,
    "6 precordial": PRECORDIAL,
    "3 (I, II, V2)": ("I", "II", "V2"),
}
FALSE_ALARM_TARGET = 0.01


def _shuffled_subsets(signals: np.ndarray, leads: tuple[str, ...], rng: np.random.Generator):
    """(N, K, T) signals of the lead set, each record's channels in its own random order, and the
    (N, K) true label of each channel."""
    columns = np.array([LEADS.index(lead) for lead in leads])
    order = np.stack([rng.permutation(len(columns)) for _ in range(len(signals))])
    labels = columns[order]
    picked = np.take_along_axis(signals[:, columns], order[:, :, None], axis=1)
    return np.ascontiguousarray(picked), labels


def _accuracy(log_probs: np.ndarray, labels: np.ndarray, n_boot: int, seed: int) -> dict:
    assigned = metrics.hungarian_assign(log_probs)
    lower, upper = metrics.bootstrap_ci(assigned, labels, metrics.lead_accuracy, n_boot, seed=seed)
    return {
        "lead_accuracy": metrics.lead_accuracy(assigned, labels),
        "lead_accuracy_ci": [lower, upper],
        "set_accuracy": metrics.set_accuracy(assigned, labels),
        "records": int(len(labels)),
    }


def accuracy_by_lead_set(loaded: Any, signals: np.ndarray, n_boot: int, seed: int) -> dict:
    from leadtune.analysis.evaluate import predict

    rng = np.random.default_rng(seed)
    found = {}
    for name, leads in LEAD_SETS.items():
        shown, labels = _shuffled_subsets(signals, leads, rng)
        found[name] = _accuracy(predict(loaded.model, shown), labels, n_boot, seed)
    return found


def _tables(loaded: Any, signals: np.ndarray) -> np.ndarray:
    """(N, K, M) log-probabilities of 10 s records, as ``label.log_probabilities`` gives them
    one record at a time, computed in batches."""
    from leadtune.analysis.evaluate import predict

    return metrics.log_softmax(predict(loaded.model, np.ascontiguousarray(signals, np.float32)))


def _verdicts(loaded: Any, recorded: np.ndarray, threshold: float) -> list[Any]:
    """``label.judge`` on every record of ``recorded`` under PTB-XL's header names, with the
    model run once per batch for the records and once for each re-inverting reversal."""
    header = list(LEADS)
    base = _tables(loaded, recorded)
    again: dict[tuple[float, ...], np.ndarray] = {}
    for reversal in REVERSALS:
        _, signs = reversal.undo(header)
        if (signs < 0).any() and tuple(signs) not in again:
            again[tuple(signs)] = _tables(loaded, recorded * signs[None, :, None])
    return [
        judge(
            loaded,
            recorded[n],
            header,
            base[n],
            metrics.hungarian_assign(base[n]),
            threshold,
            look_again=lambda signs, n=n: again[tuple(signs)][n],
        )  # fmt: skip
        for n in range(len(recorded))
    ]


def reversal_detection(loaded: Any, signals: np.ndarray, threshold: float) -> dict:
    """Detection and false-alarm rates of the labelling verdict on synthetic reversals."""
    margins_untouched, flagged_untouched = [], 0
    results: dict[str, Any] = {}
    for verdict in _verdicts(loaded, signals, threshold):
        margins_untouched.append(verdict.margin_nats or 0.0)
        flagged_untouched += verdict.status == "swap_suspected"
    for reversal in REVERSALS:
        detected = named = 0
        recorded = np.stack([reversal.apply(signal) for signal in signals])
        for verdict in _verdicts(loaded, recorded, threshold):
            detected += verdict.status == "swap_suspected"
            named += verdict.reversal == reversal.key
        results[reversal.key] = {
            "name": reversal.name,
            "detected": detected / len(signals),
            "named_correctly": named / len(signals),
            "detected_ci": list(metrics.wilson_interval(detected, len(signals))),
        }
    margins = np.array(margins_untouched)
    return {
        "threshold_nats": threshold,
        "untouched": {
            "records": len(signals),
            "false_alarms": flagged_untouched / len(signals),
            "false_alarms_ci": list(metrics.wilson_interval(flagged_untouched, len(signals))),
            "threshold_for_1pct_false_alarms": float(np.quantile(margins, 1 - FALSE_ALARM_TARGET)),
        },
        "reversals": results,
    }


def _lowpass(signals: np.ndarray, fs: int, cutoff: float) -> np.ndarray:
    from scipy import signal as sps

    sos = sps.butter(2, cutoff, btype="lowpass", fs=fs, output="sos")
    return sps.sosfilt(sos, signals, axis=-1).astype(np.float32)


def _round_trip(signals: np.ndarray, fs: int) -> np.ndarray:
    from leadtune.trainables.data.preprocess import resample

    up = resample(signals.astype(np.float64), fs, 5 * fs)
    return resample(up, 5 * fs, fs).astype(np.float32)


def other_recorders(loaded: Any, signals: np.ndarray, n_boot: int, seed: int) -> dict:
    from leadtune.analysis.evaluate import predict

    rng = np.random.default_rng(seed + 1)
    conditions = {
        "as recorded": signals,
        "gain x0.5": signals * 0.5,
        "gain x2": signals * 2.0,
        "noise 0.05 mV": signals + rng.normal(0, 0.05, signals.shape).astype(np.float32),
        "noise 0.1 mV": signals + rng.normal(0, 0.1, signals.shape).astype(np.float32),
        "low-pass 40 Hz": _lowpass(signals, loaded.fs, 40.0),
        "low-pass 25 Hz": _lowpass(signals, loaded.fs, 25.0),
        f"{loaded.fs} -> {5 * loaded.fs} -> {loaded.fs} Hz": _round_trip(signals, loaded.fs),
    }
    order_rng = np.random.default_rng(seed)
    found = {}
    for name, changed in conditions.items():
        shown, labels = _shuffled_subsets(np.asarray(changed, np.float32), LEADS, order_rng)
        found[name] = _accuracy(predict(loaded.model, shown), labels, n_boot, seed)
    return found


def run_labelling_study(
    loaded: Any, dataset: Any, split: str, n_boot: int = 2000, seed: int = 0,
    threshold: float | None = None, limit: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    from leadtune.analysis.label import swap_threshold

    rows = dataset.indices(split)[:limit]
    columns = [list(dataset.leads).index(lead) for lead in LEADS]
    signals = np.ascontiguousarray(dataset.signals[rows][:, columns], dtype=np.float32)
    threshold = swap_threshold(loaded) if threshold is None else threshold
    return {
        "model": loaded.source,
        "split": split,
        "records": int(len(rows)),
        "data_fingerprint": dataset.fingerprint,
        "by_lead_set": accuracy_by_lead_set(loaded, signals, n_boot, seed),
        "reversals": reversal_detection(loaded, signals, threshold),
        "other_recorders": other_recorders(loaded, signals, n_boot, seed),
    }


def _pct(value: float) -> str:
    return f"{100 * value:.1f} %"


def _ci(values: list[float]) -> str:
    return f"[{100 * values[0]:.1f}-{100 * values[1]:.1f}]"


def format_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Labelling study: {result['model']} on the {result['split']} split "
        f"({result['records']} ECGs)",
        "",
        "Channels shuffled per record, header names not used; Hungarian labelling against the "
        "12 leads.",
        "",
        "| leads shown | lead accuracy [95 % CI] | set accuracy |",
        "|---|---|---|",
    ]
    for name, row in result["by_lead_set"].items():
        lines.append(
            f"| {name} | {_pct(row['lead_accuracy'])} {_ci(row['lead_accuracy_ci'])} | "
            f"{_pct(row['set_accuracy'])} |"
        )
    rev = result["reversals"]
    untouched = rev["untouched"]
    lines += [
        "",
        f"Electrode reversals (threshold {rev['threshold_nats']:g} nats): false alarms on the "
        f"untouched records {_pct(untouched['false_alarms'])} {_ci(untouched['false_alarms_ci'])}"
        f"; the threshold for at most 1 % false alarms here would be "
        f"{untouched['threshold_for_1pct_false_alarms']:.2f} nats.",
        "",
        "| reversal | detected [95 % CI] | named correctly |",
        "|---|---|---|",
    ]
    for row in rev["reversals"].values():
        lines.append(
            f"| {row['name']} | {_pct(row['detected'])} {_ci(row['detected_ci'])} | "
            f"{_pct(row['named_correctly'])} |"
        )
    lines += ["", "| recording condition (K = 12) | lead accuracy [95 % CI] |", "|---|---|"]
    for name, row in result["other_recorders"].items():
        lines.append(f"| {name} | {_pct(row['lead_accuracy'])} {_ci(row['lead_accuracy_ci'])} |")
    return "\n".join(lines) + "\n"


def write_study(result: dict[str, Any], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "labelling.json", "markdown": out / "labelling.md"}
    files["json"].write_text(json.dumps(result, indent=2) + "\n")
    files["markdown"].write_text(format_markdown(result))
    return files
