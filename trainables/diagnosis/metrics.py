"""Diagnosis metrics on plain numpy arrays: probabilities ``(N, C)`` against 0/1 labels.

- AUROC per class and their mean (macro), with scikit-learn's ``roc_auc_score``; a class with
  one label value only has no AUROC (NaN) and is left out of the mean;
- F1 per class at thresholds chosen on validation (each class' threshold maximises its F1 there)
  and applied unchanged to test; macro F1 is their mean;
- Brier score: mean squared difference of probability and label over all N x C entries;
- an ECG-level bootstrap percentile interval for macro AUROC;
- the Lead-Robustness Score in the form of Lead-Minimal's main table.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score


def class_auroc(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    out = np.full(labels.shape[1], np.nan)
    for c in range(labels.shape[1]):
        if 0 < labels[:, c].sum() < len(labels):
            out[c] = roc_auc_score(labels[:, c], probs[:, c])
    return out


def macro_auroc(probs: np.ndarray, labels: np.ndarray) -> float:
    values = class_auroc(probs, labels)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def f1_at(probs: np.ndarray, labels: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    predicted = probs >= np.asarray(thresholds)[None, :]
    tp = (predicted & (labels == 1)).sum(0)
    fp = (predicted & (labels == 0)).sum(0)
    fn = (~predicted & (labels == 1)).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)


def choose_thresholds(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per class, the threshold (among the observed probabilities and 0.5) that maximises F1."""
    thresholds = np.full(labels.shape[1], 0.5)
    for c in range(labels.shape[1]):
        candidates = np.unique(np.append(probs[:, c], 0.5))
        scores = [f1_at(probs[:, c : c + 1], labels[:, c : c + 1], [t])[0] for t in candidates]
        scores = np.nan_to_num(np.asarray(scores), nan=-1.0)
        thresholds[c] = float(candidates[int(np.argmax(scores))])
    return thresholds


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean((probs - labels) ** 2))


def bootstrap_macro_auroc(
    probs: np.ndarray, labels: np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile interval of macro AUROC over ECG-level resamples (rows with replacement)."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    values = []
    for _ in range(n_boot):
        rows = rng.integers(0, n, n)
        value = macro_auroc(probs[rows], labels[rows])
        if np.isfinite(value):
            values.append(value)
    lower, upper = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lower), float(upper)


def lead_robustness_score(auroc: float, brier_score: float, auroc_12: float,
                          brier_12: float) -> float:  # fmt: skip
    """Lead-Minimal's main-table LRS: 0.7 AUROC/AUROC_12 + 0.3 (1 - (Brier - Brier_12) / 0.25).
    (Its stored results and code hold four other versions; this is the one its table prints.)"""
    return 0.7 * (auroc / auroc_12) + 0.3 * (1 - (brier_score - brier_12) / 0.25)


def summarise(probs: np.ndarray, labels: np.ndarray, thresholds: Sequence[float],
              classes: Sequence[str], prefix: str, n_boot: int = 0, seed: int = 0) -> dict:  # fmt: skip
    """The split's figures as flat ``<prefix>_...`` keys (macro and per class)."""
    per_class_auroc = class_auroc(probs, labels)
    per_class_f1 = f1_at(probs, labels, thresholds)
    out = {
        f"{prefix}_macro_auroc": float(np.nanmean(per_class_auroc)),
        f"{prefix}_macro_f1": float(np.nanmean(per_class_f1)),
        f"{prefix}_brier": brier(probs, labels),
        f"{prefix}_records": int(len(labels)),
    }
    for name, auc, f1 in zip(classes, per_class_auroc, per_class_f1):
        out[f"{prefix}_auroc_{name}"] = float(auc)
        out[f"{prefix}_f1_{name}"] = float(f1)
    if n_boot:
        lower, upper = bootstrap_macro_auroc(probs, labels, n_boot, seed)
        out[f"{prefix}_macro_auroc_ci_low"], out[f"{prefix}_macro_auroc_ci_high"] = lower, upper
    return out


def paired_bootstrap_macro_auroc(
    probs_a: np.ndarray, probs_b: np.ndarray, labels: np.ndarray, n_boot: int = 2000,
    seed: int = 0, alpha: float = 0.05,
) -> dict[str, float]:  # fmt: skip
    """Macro AUROC of model A minus model B on the same ECGs, with a percentile interval over
    ECG-level resamples (the same rows for both models in each resample) and the two-sided
    bootstrap p-value of a zero difference (twice the smaller share of resampled differences
    on either side of zero)."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    differences = []
    for _ in range(n_boot):
        rows = rng.integers(0, n, n)
        value = macro_auroc(probs_a[rows], labels[rows]) - macro_auroc(probs_b[rows], labels[rows])
        if np.isfinite(value):
            differences.append(value)
    values = np.asarray(differences)
    lower, upper = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    p_value = min(1.0, 2.0 * min((values <= 0).mean(), (values >= 0).mean()))
    return {
        "a": macro_auroc(probs_a, labels),
        "b": macro_auroc(probs_b, labels),
        "difference": macro_auroc(probs_a, labels) - macro_auroc(probs_b, labels),
        "ci_low": float(lower),
        "ci_high": float(upper),
        "p_value": float(p_value),
    }
