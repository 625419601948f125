"""How well a lead-identification model labels recordings the way ``leadtune label`` sees them:
channels shuffled and renamed, fewer than 12 leads, electrode reversals, other devices.

``leadtune evaluate MODEL --suite labelling`` runs it on one split of a prepared PTB-XL dataset:

- **lead accuracy by K**: every record's channels in a random order (seeded), for the lead sets
  12, 8 (I, II, V1-V6), 6 limb, 6 precordial and 3 (I, II, V2); Hungarian labelling against
  the 12 candidates; ECG-level bootstrap intervals;
- **electrode reversals**: each named reversal applied to every record (the header keeps the
  standard names), and separately two leads no reversal names exchanged (a seeded random pair
  per record), judged by the labelling verdict; detection rate, the share named correctly (for
  the exchange: no reversal named and exactly the pair listed), and the false-alarm rate on the
  untouched records; the per-hypothesis thresholds this split would choose
  (``choose_thresholds``: choose them on validation, report on test);
- **other recorders**: lead accuracy (K = 12) after gains, added noise, other front-end low-pass
  filters, and a 100 -> 500 -> 100 Hz round trip through the reader's resampling.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from leadtune.trainables.data.leads import LEADS
from leadtune.trainables.lead_id import metrics
from leadtune.trainables.lead_id.delivery.label import (
    as_thresholds,
    decide,
    hypothesis_scores,
    threshold_of,
)
from leadtune.trainables.lead_id.reversals import REVERSALS
from leadtune.trainables.lead_id.robustness import LEAD_SETS
from leadtune.trainables.lead_id.robustness import shuffled_subsets as _shuffled_subsets

FALSE_ALARM_TARGET = 0.01
# A reversal must beat the header's labelling by at least this many nats to be flagged.
THRESHOLD_FLOOR = 1.0


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
    from leadtune.trainables.lead_id.delivery.evaluation import predict

    rng = np.random.default_rng(seed)
    found = {}
    for name, leads in LEAD_SETS.items():
        shown, labels = _shuffled_subsets(signals, leads, rng)
        found[name] = _accuracy(predict(loaded.model, shown), labels, n_boot, seed)
    return found


def _tables(loaded: Any, signals: np.ndarray) -> np.ndarray:
    """(N, K, M) log-probabilities of 10 s records, as ``label.log_probabilities`` gives them
    one record at a time, computed in batches."""
    from leadtune.trainables.lead_id.delivery.evaluation import predict

    return metrics.log_softmax(predict(loaded.model, np.ascontiguousarray(signals, np.float32)))


Scored = list[tuple[dict[str, float] | None, list[str]]]  # per record: scores, best labelling


def _scored(loaded: Any, recorded: np.ndarray) -> Scored:
    """Every hypothesis' score (``label.hypothesis_scores``) for every record of ``recorded``
    under PTB-XL's header names, with the model run once per batch for the records and once for
    each re-inverting reversal."""
    header = list(LEADS)
    base = _tables(loaded, recorded)
    again: dict[tuple[float, ...], np.ndarray] = {}
    for reversal in REVERSALS:
        _, signs = reversal.undo(header)
        if (signs < 0).any() and tuple(signs) not in again:
            again[tuple(signs)] = _tables(loaded, recorded * signs[None, :, None])
    found = []
    for n in range(len(recorded)):
        assigned = metrics.hungarian_assign(base[n])
        scores = hypothesis_scores(
            loaded, recorded[n], header, base[n], assigned,
            look_again=lambda signs, n=n: again[tuple(signs)][n],
        )  # fmt: skip
        found.append((scores, [loaded.leads[j] for j in assigned]))
    return found


def _decided(scored: Scored, thresholds: dict[str, float]) -> list[Any]:
    """``label.decide`` on every scored record under PTB-XL's header names."""
    return [decide(scores, thresholds, list(LEADS), best) for scores, best in scored]


def _verdicts(loaded: Any, recorded: np.ndarray, thresholds: Any) -> list[Any]:
    """``label.judge`` on every record of ``recorded`` under PTB-XL's header names, computed in
    batches (the same verdicts as judging one record at a time)."""
    return _decided(_scored(loaded, recorded), as_thresholds(thresholds))


# Besides the named reversals: two leads no reversal names, exchanged (a random pair per record),
# which only the "pair" and "other" hypotheses can catch; the verdict should list the pair.
EXCHANGE = "exchange"
EXCHANGE_NAME = "two other leads exchanged"


def _exchanged_pairs(count: int, seed: int = 0) -> list[tuple[int, int]]:
    """A random pair of lead indices per record, never a neighbour-precordial pair."""
    named = {frozenset(r.leads) for r in REVERSALS if len(r.leads) == 2}
    pairs = [
        (i, j)
        for i in range(len(LEADS))
        for j in range(i + 1, len(LEADS))
        if frozenset((LEADS[i], LEADS[j])) not in named
    ]
    rng = np.random.default_rng(seed)
    return [pairs[k] for k in rng.integers(0, len(pairs), count)]


def score_reversals(loaded: Any, signals: np.ndarray) -> dict[str, Scored]:
    """Scores of the untouched records, of every named reversal applied to each of them, and of
    each with two other leads exchanged."""
    from tqdm import tqdm

    progress = tqdm(
        total=len(REVERSALS) + 2, desc=f"scoring swaps ({len(signals)} ECGs)", unit="set",
        file=sys.stderr, disable=not sys.stderr.isatty(), leave=False,
    )  # fmt: skip
    found = {"untouched": _scored(loaded, signals)}
    progress.update()
    for reversal in REVERSALS:
        recorded = np.stack([reversal.apply(signal) for signal in signals])
        found[reversal.key] = _scored(loaded, recorded)
        progress.update()
    recorded = np.array(signals, copy=True)
    for n, (i, j) in enumerate(_exchanged_pairs(len(signals))):
        recorded[n, [i, j]] = signals[n, [j, i]]
    found[EXCHANGE] = _scored(loaded, recorded)
    progress.close()
    return found


def _margins(scored: Scored, keys: list[str]) -> np.ndarray:
    """(records, hypotheses) margins over the header's labelling; -inf where not tested."""
    rows = [scores for scores, _ in scored if scores is not None]
    return np.array(
        [[scores[key] - scores["identity"] if key in scores else -np.inf for key in keys]
         for scores in rows]
    ).reshape(len(rows), len(keys))  # fmt: skip


def _tail_quantile(values: np.ndarray, rate: float) -> float:
    """The margin an untouched record exceeds with probability ``rate``.

    Within the data, the empirical quantile; beyond the few largest values it is extrapolated
    with an exponential tail fitted to the largest tenth (at least 10 values): above their
    smallest, u, P(margin > u + x) = (m / n) exp(-x / mean excess). A threshold at the largest
    margin seen in n records still flags about 1 / (n + 1) of new ones, so with several
    hypotheses the empirical maxima alone give several times the target on new data."""
    finite = np.sort(values[np.isfinite(values)])[::-1]
    if not len(finite):
        return -np.inf
    n = len(finite)
    m = min(n, max(10, n // 10))
    if rate >= m / n:
        return float(np.quantile(finite, 1 - rate))
    u = finite[m - 1]
    scale = max(float(np.mean(finite[:m] - u)), 0.1)
    return float(u + scale * np.log((m / n) / rate))


def choose_thresholds(
    scored: dict[str, Scored],
    target: float = FALSE_ALARM_TARGET,
    floor: float = THRESHOLD_FLOOR,
    steps: int = 40,
) -> dict[str, float]:
    """Per-hypothesis thresholds for an expected ``target`` share of false alarms on new
    untouched records, spent where it detects the most reversals of ``scored``.

    Hypotheses move different amounts (a neighbour-precordial swap a few nats, the free best
    labelling tens), so one threshold for all would have to be the largest of them. Each
    hypothesis h gets a false-alarm rate a_h and the threshold its untouched margins exceed
    with that probability (``_tail_quantile``); the rates add up to at most the target (a union
    bound, so the records any hypothesis flags stay within it). Every hypothesis starts at a
    hundredth of an even share; the rest is handed out in ``steps`` equal parts, greedily to the
    hypothesis (and number of parts) that detects the most more synthetic reversals per part;
    what detects nothing more is not spent. No threshold goes
    below ``floor`` nats: a reversal has to beat the header, not only tie it."""
    if not 0 < target < 1:
        raise ValueError(f"the false-alarm target must be between 0 and 1, got {target}")
    untouched = [s for s, _ in scored["untouched"] if s is not None]
    keys = sorted({key for s in untouched for key in s if key != "identity"})
    clean = _margins(scored["untouched"], keys)  # (N, H)
    swapped = np.concatenate(
        [_margins(found, keys) for name, found in scored.items() if name != "untouched"]
        or [np.empty((0, len(keys)))]
    )  # (S * N, H)

    def threshold(h: int, rate: float) -> float:
        return max(floor, round(_tail_quantile(clean[:, h], rate) + 0.005, 2))

    base = target / len(keys) / 100
    rates = np.full(len(keys), base)
    step = (target - base * len(keys)) / steps
    thresholds = np.array([threshold(h, rates[h]) for h in range(len(keys))])
    left = steps
    while left:
        flagged = swapped > thresholds
        detected = int(flagged.any(axis=1).sum())
        best = (0.0, 0, 0)  # (new detections per step, hypothesis, steps)
        for h in range(len(keys)):
            others = np.delete(flagged, h, axis=1).any(axis=1)
            for k in range(1, left + 1):  # a threshold may need several steps before it pays
                lowered = threshold(h, rates[h] + k * step)
                gain = int((others | (swapped[:, h] > lowered)).sum()) - detected
                if gain / k > best[0]:
                    best = (gain / k, h, k)
        if best[2] == 0:
            break  # no hypothesis detects more: the rest of the target is not spent
        _, h, k = best
        rates[h] += k * step
        thresholds[h] = threshold(h, rates[h])
        left -= k
    return {key: float(value) for key, value in zip(keys, thresholds)}


def detection(scored: dict[str, Scored], thresholds: Any) -> dict:
    """Detection and false-alarm rates of the labelling verdict on scored records."""
    chosen = as_thresholds(thresholds)
    verdicts = _decided(scored["untouched"], chosen)
    flagged_untouched = sum(v.status == "swap_suspected" for v in verdicts)
    n = len(verdicts)
    results: dict[str, Any] = {}
    by_key = {r.key: r for r in REVERSALS}
    pairs = _exchanged_pairs(n)
    for key, records in scored.items():
        if key == "untouched":
            continue
        found = _decided(records, chosen)
        detected = sum(v.status == "swap_suspected" for v in found)
        if key in by_key:
            named = sum(v.reversal == key for v in found)
        else:  # right when no reversal is named and exactly the pair is listed
            named = sum(
                v.status == "swap_suspected"
                and v.reversal is None
                and sorted(map(tuple, v.exchanged))
                == sorted([(LEADS[i], LEADS[j]), (LEADS[j], LEADS[i])])
                for v, (i, j) in zip(found, pairs)
            )
        results[key] = {
            "name": by_key[key].name if key in by_key else EXCHANGE_NAME,
            "threshold_nats": threshold_of(chosen, key if key in by_key else "pair"),
            "detected": detected / n,
            "named_correctly": named / n,
            "detected_ci": list(metrics.wilson_interval(detected, n)),
        }
    return {
        "thresholds_nats": chosen,
        "untouched": {
            "records": n,
            "false_alarms": flagged_untouched / n,
            "false_alarms_ci": list(metrics.wilson_interval(flagged_untouched, n)),
            "thresholds_for_1pct_false_alarms": choose_thresholds(scored),
        },
        "reversals": results,
    }


def reversal_detection(loaded: Any, signals: np.ndarray, thresholds: Any) -> dict:
    """Detection and false-alarm rates of the labelling verdict on synthetic reversals."""
    return detection(score_reversals(loaded, signals), thresholds)


def _lowpass(signals: np.ndarray, fs: int, cutoff: float) -> np.ndarray:
    from scipy import signal as sps

    sos = sps.butter(2, cutoff, btype="lowpass", fs=fs, output="sos")
    return sps.sosfilt(sos, signals, axis=-1).astype(np.float32)


def _round_trip(signals: np.ndarray, fs: int) -> np.ndarray:
    from leadtune.trainables.data.preprocess import resample

    up = resample(signals.astype(np.float64), fs, 5 * fs)
    return resample(up, 5 * fs, fs).astype(np.float32)


def other_recorders(loaded: Any, signals: np.ndarray, n_boot: int, seed: int) -> dict:
    from leadtune.trainables.lead_id.delivery.evaluation import predict

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
    from leadtune.trainables.lead_id.delivery.label import swap_thresholds

    rows = dataset.indices(split)[:limit]
    columns = [list(dataset.leads).index(lead) for lead in LEADS]
    signals = np.ascontiguousarray(dataset.signals[rows][:, columns], dtype=np.float32)
    threshold = swap_thresholds(loaded) if threshold is None else threshold
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
    chosen = rev["thresholds_nats"]
    other = chosen["other"]
    pair = chosen.get("pair", other)
    lines += [
        "",
        f"Electrode reversals: false alarms on the untouched records "
        f"{_pct(untouched['false_alarms'])} {_ci(untouched['false_alarms_ci'])}. Each hypothesis "
        f"has its own threshold (nats above the header's labelling; {pair:g} for the best single "
        f"exchange of two channels, {other:g} for the best labelling of all).",
        "",
        "| swap | threshold (nats) | detected [95 % CI] | named correctly (exchange: the pair "
        "listed) |",
        "|---|---|---|---|",
    ]
    for row in rev["reversals"].values():
        lines.append(
            f"| {row['name']} | {row['threshold_nats']:g} | {_pct(row['detected'])} "
            f"{_ci(row['detected_ci'])} | {_pct(row['named_correctly'])} |"
        )
    here = untouched["thresholds_for_1pct_false_alarms"]
    lines += [
        "",
        "Thresholds this split would choose (an expected 1 % false alarms): "
        + ", ".join(f"{key} {value:g}" for key, value in here.items())
        + ".",
    ]
    lines += ["", "| recording condition (K = 12) | lead accuracy [95 % CI] |", "|---|---|"]
    for name, row in result["other_recorders"].items():
        lines.append(f"| {name} | {_pct(row['lead_accuracy'])} {_ci(row['lead_accuracy_ci'])} |")
    return "\n".join(lines) + "\n"


def write_study(result: dict[str, Any], out: Path) -> dict[str, Path]:
    from leadtune.analysis.suites import write_result

    return write_result(out, "labelling", result, format_markdown(result))
