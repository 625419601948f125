"""Statistics for ECG lead identification, on plain numpy arrays.

Predicted and true lead labels are integer arrays shaped (N, K): N ECGs with K lead slots each,
labels 0..n_classes-1 in the order of ``LEAD_NAMES``. A lead slot counts as present when the
optional boolean ``mask`` (N, K) is True there and its true label is not -1, so padded lead sets
and ECGs with fewer than K leads need no special handling by the caller.

The statistics follow the reference paper: lead accuracy with an ECG-level bootstrap interval
(leads of one ECG are not independent), set accuracy and per-lead recall with Wilson score
intervals, McNemar's test on paired lead-level correctness, and the injective labelling of a
recording by the Hungarian method. Only numpy and scipy are used, so this module also runs where
torch and Ray are not installed.
"""

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

LEAD_NAMES: tuple[str, ...] = (
    "I",
    "II",
    "III",
    "aVR",
    "aVL",
    "aVF",
    "V1",
    "V2",
    "V3",
    "V4",
    "V5",
    "V6",
)

# Resamples are drawn in fixed-size blocks so that the random stream (and so the interval) does
# not depend on which code path evaluates the statistic, while memory stays at a few tens of MB.
_BOOTSTRAP_BLOCK = 1000


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Log-probabilities log(exp(x_i) / sum_j exp(x_j)) along ``axis``.

    Computed as x - max(x) - log(sum(exp(x - max(x)))), which neither overflows for large logits
    nor loses the largest entry to underflow.
    """
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - np.max(x, axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def _as_batch(scores: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, bool]:
    """Scores as (N, K, M) plus a boolean (N, K) mask; the flag says the input was one ECG."""
    x = np.asarray(scores, dtype=np.float64)
    single = x.ndim == 2
    if single:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(
            f"lead-ID metrics: scores must be shaped (K, M) or (N, K, M), got {x.shape}; "
            "pass one ECG's lead-by-label matrix or a batch of them."
        )
    n, k, m = x.shape
    if k > m:
        raise ValueError(
            f"lead-ID metrics: {k} leads but only {m} labels; an injective labelling needs "
            "K <= M, so pass scores shaped (..., K, M) with leads on the second-last axis."
        )
    if mask is None:
        present = np.ones((n, k), dtype=bool)
    else:
        present = np.asarray(mask, dtype=bool)
        if single and present.ndim == 1:
            present = present[None]
        if present.shape != (n, k):
            raise ValueError(
                f"lead-ID metrics: mask shape {present.shape} does not match the (N, K) = "
                f"{(n, k)} of the scores; pass one boolean per lead slot."
            )
    if np.isnan(x[present]).any():
        raise ValueError(
            "lead-ID metrics: scores contain NaN for a present lead; check the model output "
            "or mask that lead out."
        )
    return x, present, single


def _reject_probabilities(rows: np.ndarray) -> None:
    """Refuse score rows that are probabilities: summing them is not a joint log-probability."""
    if rows.size and np.all(rows >= 0) and np.allclose(rows.sum(axis=-1), 1):
        raise ValueError(
            "lead-ID metrics: scores look like probabilities (non-negative rows summing to "
            "1); pass logits or log-probabilities, e.g. np.log(probabilities)."
        )


def hungarian_assign(logprobs: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Injective lead labelling of each ECG that maximises the summed log-probability.

    ``logprobs`` is shaped (K, M) or (N, K, M) with K <= M: leads by labels, one matrix per ECG.
    Pass log-probabilities (see ``log_softmax``), not probabilities: maximising a sum of
    log-probabilities maximises the joint probability of the labelling. Raw logits give the same
    answer, because every lead receives exactly one label and so a per-lead shift (the
    log-normaliser) adds the same constant to every labelling.

    Returns the assigned label per lead, shaped (K,) or (N, K); no label is used twice within an
    ECG. Lead slots where ``mask`` (N, K) is False take no part in the assignment and get -1.
    """
    x, present, single = _as_batch(logprobs, mask)
    _reject_probabilities(x[present])
    assigned = np.full(present.shape, -1, dtype=np.int64)
    for i in range(x.shape[0]):
        leads = np.flatnonzero(present[i])
        if leads.size == 0:
            continue
        rows, cols = linear_sum_assignment(x[i, leads], maximize=True)
        assigned[i, leads[rows]] = cols
    return assigned[0] if single else assigned


def argmax_assign(logprobs: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Most probable label of each lead on its own, shaped (K,) or (N, K); may repeat labels.

    Accepts logits or log-probabilities shaped (K, M) or (N, K, M) (the argmax is the same for
    both). Lead slots where ``mask`` (N, K) is False get -1.
    """
    x, present, single = _as_batch(logprobs, mask)
    assigned = np.where(present, np.argmax(x, axis=-1), -1).astype(np.int64)
    return assigned[0] if single else assigned


def _present_mask(true: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Boolean (N, K): the slot holds a lead (mask True, or no mask) and its true label is not -1."""
    present = true >= 0
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != true.shape:
            raise ValueError(
                f"lead-ID metrics: mask {mask.shape} must have the shape of true "
                f"{true.shape}; pass one boolean per lead slot."
            )
        present &= mask
    return present


def _present_leads(
    pred: np.ndarray, true: np.ndarray, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated integer (pred, true) and boolean present arrays, all shaped (N, K)."""
    pred = np.asarray(pred)
    true = np.asarray(true)
    if pred.shape != true.shape or pred.ndim != 2:
        raise ValueError(
            f"lead-ID metrics: pred {pred.shape} and true {true.shape} must both be shaped "
            "(N, K), one label per ECG and lead slot."
        )
    return pred.astype(np.int64), true.astype(np.int64), _present_mask(true, mask)


def correct_leads(pred: np.ndarray, true: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Boolean (N, K): the lead is present and its predicted label equals the true one.

    Absent slots are False, so two such arrays from different models can go straight into
    ``mcnemar``: a slot that is False for both models adds to neither discordant count.
    """
    pred, true, present = _present_leads(pred, true, mask)
    return present & (pred == true)


def lead_accuracy(pred: np.ndarray, true: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Correctly labelled lead instances / present lead instances (NaN when none is present)."""
    pred, true, present = _present_leads(pred, true, mask)
    n_present = int(present.sum())
    if n_present == 0:
        return float("nan")
    return float((present & (pred == true)).sum() / n_present)


def set_accuracy(pred: np.ndarray, true: np.ndarray, mask: np.ndarray | None = None) -> float:
    """ECGs whose present leads are all correct / ECGs with at least one present lead.

    With full 12-lead sets this is the paper's "ECGs with all K leads correct / N". An ECG without
    any present lead is left out of both counts rather than counted as vacuously correct.
    NaN when no ECG has a present lead.
    """
    successes, n = _set_counts(*_present_leads(pred, true, mask))
    return float("nan") if n == 0 else successes / n


def _set_counts(pred: np.ndarray, true: np.ndarray, present: np.ndarray) -> tuple[int, int]:
    """(ECGs with every present lead correct, ECGs with at least one present lead)."""
    has_leads = present.any(axis=1)
    all_correct = ~(present & (pred != true)).any(axis=1)
    return int((has_leads & all_correct).sum()), int(has_leads.sum())


def per_lead_counts(
    pred: np.ndarray, true: np.ndarray, n_classes: int = 12, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per true label: (correctly labelled present leads, present leads), two int arrays.

    Both are shaped (n_classes,); ``successes[c] / totals[c]`` is the recall of label c, and the
    pair feeds ``wilson_interval`` directly.
    """
    pred, true, present = _present_leads(pred, true, mask)
    labels = true[present]
    if labels.size and labels.max() >= n_classes:
        raise ValueError(
            f"lead-ID metrics: true label {labels.max()} is outside 0..{n_classes - 1}; "
            "pass the right n_classes."
        )
    hits = labels[pred[present] == labels]
    totals = np.bincount(labels, minlength=n_classes).astype(np.int64)
    successes = np.bincount(hits, minlength=n_classes).astype(np.int64)
    return successes, totals


def per_lead_recall(
    pred: np.ndarray, true: np.ndarray, n_classes: int = 12, mask: np.ndarray | None = None
) -> np.ndarray:
    """Recall per true label, shaped (n_classes,): among present leads whose true label is c,
    the fraction predicted as c. NaN for a label that never occurs."""
    successes, totals = per_lead_counts(pred, true, n_classes, mask)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, successes / np.maximum(totals, 1), np.nan)


def wilson_interval(
    successes: int | np.ndarray, n: int | np.ndarray, z: float = 1.96
) -> tuple[float, float] | tuple[np.ndarray, np.ndarray]:
    """Wilson score interval for a binomial proportion.

    With p = successes / n the bounds are
    (p + z^2/(2n) -/+ z * sqrt(p(1 - p)/n + z^2/(4n^2))) / (1 + z^2/n),
    i.e. the proportions whose score test against p is not rejected at level z. Works on scalars
    (returns two floats) and elementwise on arrays (returns two arrays); n = 0 gives NaN.
    """
    s = np.asarray(successes, dtype=np.float64)
    total = np.asarray(n, dtype=np.float64)
    if np.any(s < 0) or np.any(s > total):
        raise ValueError(
            "lead-ID metrics: wilson_interval needs 0 <= successes <= n; check the counts."
        )
    with np.errstate(invalid="ignore", divide="ignore"):
        p = s / total
        z2n = z * z / total
        centre = (p + z2n / 2) / (1 + z2n)
        half = z / (1 + z2n) * np.sqrt(p * (1 - p) / total + z2n / (4 * total))
        # At 0/n and n/n the exact bound is 0 or 1, which the formula only reaches up to rounding.
        lower = np.where(s == 0, 0.0, np.clip(centre - half, 0.0, 1.0))
        upper = np.where(s == total, 1.0, np.clip(centre + half, 0.0, 1.0))
        lower = np.where(total > 0, lower, np.nan)
        upper = np.where(total > 0, upper, np.nan)
    if lower.ndim == 0:
        return float(lower), float(upper)
    return lower, upper


Statistic = Callable[..., float]


def bootstrap_distribution(
    pred: np.ndarray,
    true: np.ndarray,
    statistic: Statistic = lead_accuracy,
    n_boot: int = 10_000,
    seed: int = 0,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """The statistic on ``n_boot`` ECG-level bootstrap resamples, shaped (n_boot,).

    Each resample draws N ECG rows with replacement (all leads of a drawn ECG come along) and
    evaluates ``statistic(pred_rows, true_rows, mask=mask_rows)``. ``lead_accuracy`` and
    ``set_accuracy`` are computed from per-ECG counts for all resamples at once; any other
    callable is evaluated resample by resample, on the same resamples for the same seed.
    """
    pred, true, present = _present_leads(pred, true, mask)
    if n_boot < 1:
        raise ValueError(f"lead-ID metrics: n_boot must be at least 1, got {n_boot}.")
    n = true.shape[0]
    if n == 0:
        raise ValueError("lead-ID metrics: cannot bootstrap zero ECGs; pass at least one.")
    if statistic is lead_accuracy:
        per_ecg_hits = (present & (pred == true)).sum(axis=1)
        per_ecg_total = present.sum(axis=1)
    elif statistic is set_accuracy:
        per_ecg_total = present.any(axis=1).astype(np.int64)
        per_ecg_hits = per_ecg_total * ~(present & (pred != true)).any(axis=1)
    else:
        per_ecg_hits = per_ecg_total = None

    rng = np.random.default_rng(seed)
    values = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, _BOOTSTRAP_BLOCK):
        stop = min(start + _BOOTSTRAP_BLOCK, n_boot)
        rows = rng.integers(0, n, size=(stop - start, n))
        if per_ecg_hits is not None:
            hits = per_ecg_hits[rows].sum(axis=1)
            total = per_ecg_total[rows].sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                values[start:stop] = np.where(total > 0, hits / np.maximum(total, 1), np.nan)
        else:
            for j, r in enumerate(rows):
                values[start + j] = statistic(pred[r], true[r], mask=present[r])
    return values


def bootstrap_ci(
    pred: np.ndarray,
    true: np.ndarray,
    statistic: Statistic = lead_accuracy,
    n_boot: int = 10_000,
    alpha: float = 0.05,
    seed: int = 0,
    mask: np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile interval of an ECG-level bootstrap: the alpha/2 and 1 - alpha/2 quantiles
    (2.5th and 97.5th percentiles by default, linear interpolation) of the statistic over
    ``n_boot`` resamples of the ECGs (see ``bootstrap_distribution``). Resamples in which the
    statistic is undefined (NaN, e.g. no present lead) are left out; the same seed gives the same
    interval."""
    if not 0 < alpha < 1:
        raise ValueError(f"lead-ID metrics: alpha must lie in (0, 1), got {alpha}.")
    values = bootstrap_distribution(pred, true, statistic, n_boot, seed, mask)
    lower, upper = np.nanpercentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lower), float(upper)


@dataclass(frozen=True)
class McNemarResult:
    """McNemar's test on paired correctness: b = only A correct, c = only B correct."""

    b: int
    c: int
    statistic: float
    p_value: float


def _discordant(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[int, int]:
    """(b, c): items only A gets right, items only B gets right."""
    a = np.asarray(correct_a, dtype=bool)
    b_arr = np.asarray(correct_b, dtype=bool)
    if a.shape != b_arr.shape:
        raise ValueError(
            f"lead-ID metrics: correct_a {a.shape} and correct_b {b_arr.shape} must have the "
            "same shape; pass correctness of both models on the same items."
        )
    return int((a & ~b_arr).sum()), int((~a & b_arr).sum())


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemarResult:
    """McNemar's chi-square test with continuity correction for two models on the same items.

    ``correct_a`` and ``correct_b`` are boolean arrays of the same shape (flattened), e.g. from
    ``correct_leads``. With b = A right and B wrong, c = A wrong and B right, the statistic is
    (|b - c| - 1)^2 / (b + c) and the p-value its upper tail under chi-square with 1 degree of
    freedom. Without discordant pairs (b + c = 0) the statistic is 0 and p is 1.
    """
    b, c = _discordant(correct_a, correct_b)
    if b + c == 0:
        return McNemarResult(b=b, c=c, statistic=0.0, p_value=1.0)
    statistic = (abs(b - c) - 1) ** 2 / (b + c)
    # imported here: scipy.stats costs ~0.8 CPU s, and training (which imports this module in
    # every trial) needs only the Hungarian assignment above, not these two tests
    from scipy.stats import chi2

    return McNemarResult(b=b, c=c, statistic=float(statistic), p_value=float(chi2.sf(statistic, 1)))


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemarResult:
    """McNemar's exact test: with b = only A correct and c = only B correct, the two-sided
    binomial probability of a split at least as uneven as (b, c) among b + c discordant items
    when either model is equally likely to be the right one. ``statistic`` is b - c."""
    b, c = _discordant(correct_a, correct_b)
    if b + c == 0:
        return McNemarResult(b=b, c=c, statistic=0.0, p_value=1.0)
    from scipy.stats import binom

    p_value = min(1.0, 2.0 * float(binom.cdf(min(b, c), b + c, 0.5)))
    return McNemarResult(b=b, c=c, statistic=float(b - c), p_value=p_value)


def confusion_matrix(
    pred: np.ndarray, true: np.ndarray, n_classes: int = 12, mask: np.ndarray | None = None
) -> np.ndarray:
    """Counts of present leads, shaped (n_classes, n_classes): rows true label, columns predicted."""
    pred, true, present = _present_leads(pred, true, mask)
    t = true[present].astype(np.int64)
    p = pred[present].astype(np.int64)
    if t.size and (t.max() >= n_classes or p.min() < 0 or p.max() >= n_classes):
        raise ValueError(
            f"lead-ID metrics: a label of a present lead is outside 0..{n_classes - 1}; "
            "pass the right n_classes, or mask out leads that were given no label."
        )
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )


def _nan_to_none(values: np.ndarray) -> list:
    """Plain list with NaN as None, so the summary is strict JSON."""
    return [None if np.isnan(v) else float(v) for v in np.asarray(values, dtype=np.float64)]


def _method_summary(
    pred: np.ndarray,
    true: np.ndarray,
    present: np.ndarray,
    n_classes: int,
    n_boot: int,
    alpha: float,
    z: float,
    seed: int,
) -> dict:
    """Every statistic of one labelling method; see ``summarize``."""
    correct = present & (pred == true)
    leads_correct, leads_present = int(correct.sum()), int(present.sum())
    sets_correct, sets_total = _set_counts(pred, true, present)
    successes, totals = per_lead_counts(pred, true, n_classes, present)
    recall_lower, recall_upper = wilson_interval(successes, totals, z)
    set_lower, set_upper = wilson_interval(sets_correct, sets_total, z)
    lead_lower, lead_upper = bootstrap_ci(pred, true, lead_accuracy, n_boot, alpha, seed, present)
    return {
        "lead_accuracy": _nan_to_none([lead_accuracy(pred, true, present)])[0],
        "lead_accuracy_ci": _nan_to_none([lead_lower, lead_upper]),
        "leads_correct": leads_correct,
        "leads_present": leads_present,
        "set_accuracy": _nan_to_none([set_accuracy(pred, true, present)])[0],
        "set_accuracy_ci": _nan_to_none([set_lower, set_upper]),
        "sets_correct": sets_correct,
        "sets_total": sets_total,
        "per_lead_recall": _nan_to_none(per_lead_recall(pred, true, n_classes, present)),
        "per_lead_recall_ci": [
            list(pair) for pair in zip(_nan_to_none(recall_lower), _nan_to_none(recall_upper))
        ],
        "per_lead_correct": successes.tolist(),
        "per_lead_total": totals.tolist(),
        "confusion_matrix": confusion_matrix(pred, true, n_classes, present).tolist(),
    }


def summarize(
    logprobs: np.ndarray,
    true: np.ndarray,
    mask: np.ndarray | None = None,
    n_boot: int = 10_000,
    seed: int = 0,
    alpha: float = 0.05,
    z: float = 1.96,
    label_names: tuple[str, ...] | None = None,
) -> dict:
    """The paper's statistics for argmax and Hungarian labelling, as a JSON-ready dict.

    ``logprobs`` (N, K, M) holds logits or log-probabilities (both give the same labellings);
    ``true`` (N, K) the true labels, -1 or ``mask`` False for absent lead slots, which are also
    kept out of the Hungarian assignment. For each of "argmax" and "hungarian": lead accuracy with
    its ECG-level bootstrap percentile interval (``n_boot`` resamples, level 1 - alpha, the same
    resamples for both methods), set accuracy and per-label recall with Wilson intervals (z), the
    underlying counts and the confusion matrix (rows true, columns predicted). "hungarian_vs_argmax"
    is McNemar's test on paired lead-level correctness (b = only Hungarian correct). Undefined
    values (a label that never occurs) are None.
    """
    x = np.asarray(logprobs, dtype=np.float64)
    if x.ndim != 3:
        raise ValueError(
            f"lead-ID metrics: summarize needs scores shaped (N, K, M), got {x.shape}."
        )
    n_classes = x.shape[-1]
    true = np.asarray(true).astype(np.int64)
    if true.shape != x.shape[:2]:
        raise ValueError(
            f"lead-ID metrics: true {true.shape} must be shaped (N, K) = {x.shape[:2]}, "
            "one label per ECG and lead slot of the scores."
        )
    present = _present_mask(true, mask)
    _reject_probabilities(x[present])
    if label_names is None:
        label_names = (
            LEAD_NAMES if n_classes == len(LEAD_NAMES) else tuple(str(c) for c in range(n_classes))
        )
    if len(label_names) != n_classes:
        raise ValueError(
            f"lead-ID metrics: {len(label_names)} label names for {n_classes} classes; "
            "pass one name per column of the scores."
        )
    # Normalising changes neither labelling, but makes logits and log-probabilities one input.
    logp = log_softmax(x)
    labelled = {
        "argmax": argmax_assign(logp, present),
        "hungarian": hungarian_assign(logp, present),
    }
    result = {
        "n_ecgs": int(true.shape[0]),
        "n_classes": n_classes,
        "labels": list(label_names),
        "n_boot": n_boot,
        "alpha": alpha,
        "z": z,
        "seed": seed,
    }
    for method, pred in labelled.items():
        result[method] = _method_summary(pred, true, present, n_classes, n_boot, alpha, z, seed)
    test = mcnemar(
        correct_leads(labelled["hungarian"], true, present),
        correct_leads(labelled["argmax"], true, present),
    )
    result["hungarian_vs_argmax"] = asdict(test)
    return result
