"""Lead identification as a labeller meets it: fewer than 12 leads, and noisy recorders.

One definition of the conditions, used by training (``robust_validation``: each epoch's
``val_robust_accuracy`` and the fine-tuning score) and by the labelling study
(``leadtune evaluate --suite labelling``):

- lead sets: 12, 8 (I, II, V1-V6), 6 limb, 6 precordial, 3 (I, II, V2); each record's channels
  in its own random order, labelled by Hungarian matching against the 12 candidates;
- noise: 12 leads with white Gaussian noise of 0.05 and 0.1 mV added.

The conditions are drawn once from a seed, so every epoch of a run is judged on the same
subsets, orders and noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from leadtune.trainables.data.leads import LEADS
from leadtune.trainables.lead_id import metrics
from leadtune.trainables.lead_id.config import LIMB, PRECORDIAL

LEAD_SETS: dict[str, tuple[str, ...]] = {
    "12": LEADS,
    "8 (I, II, V1-V6)": ("I", "II", *PRECORDIAL),
    "6 limb": LIMB,
    "6 precordial": PRECORDIAL,
    "3 (I, II, V2)": ("I", "II", "V2"),
}
NOISE_MV = (0.05, 0.1)
# metric key of each condition that val_robust_accuracy averages (12 clean leads are val_*)
CONDITION_KEYS = {
    "8 (I, II, V1-V6)": "val_accuracy_8_leads",
    "6 limb": "val_accuracy_6_limb",
    "6 precordial": "val_accuracy_6_precordial",
    "3 (I, II, V2)": "val_accuracy_3_leads",
    "noise 0.05 mV": "val_accuracy_noise_0.05mV",
    "noise 0.1 mV": "val_accuracy_noise_0.1mV",
}


@dataclass
class Condition:
    name: str
    key: str
    signals: np.ndarray  # (N, K, T) float32, channels shuffled per record
    labels: np.ndarray  # (N, K) the true lead index (in LEADS) of each channel


def shuffled_subsets(
    signals: np.ndarray, leads: tuple[str, ...], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(N, K, T) signals of the lead set (``signals`` in LEADS order), each record's channels in
    its own random order, and the (N, K) true label of each channel."""
    columns = np.array([LEADS.index(lead) for lead in leads])
    order = np.stack([rng.permutation(len(columns)) for _ in range(len(signals))])
    labels = columns[order]
    picked = np.take_along_axis(signals[:, columns], order[:, :, None], axis=1)
    return np.ascontiguousarray(picked), labels


def validation_conditions(signals: np.ndarray, seed: int = 0) -> list[Condition]:
    """The fewer-leads and noise conditions of :data:`CONDITION_KEYS` for (N, 12, T) signals in
    LEADS order, drawn once from ``seed``."""
    rng = np.random.default_rng(seed)
    found = []
    for name, leads in LEAD_SETS.items():
        if name == "12":
            continue
        shown, labels = shuffled_subsets(signals, leads, rng)
        found.append(Condition(name, CONDITION_KEYS[name], shown, labels))
    for sigma in NOISE_MV:
        noisy = signals + rng.normal(0.0, sigma, signals.shape).astype(np.float32)
        shown, labels = shuffled_subsets(noisy.astype(np.float32), LEADS, rng)
        name = f"noise {sigma:g} mV"
        found.append(Condition(name, CONDITION_KEYS[name], shown, labels))
    return found


def hungarian_lead_accuracy(log_probs: np.ndarray, labels: np.ndarray) -> float:
    return metrics.lead_accuracy(metrics.hungarian_assign(log_probs), labels)


def finetune_score(robust_accuracy: float, val_loss: float, start_val_loss: float,
                   tolerance: float) -> float:  # fmt: skip
    """The fine-tuning objective (maximised).

    Where the 12-lead validation loss is no worse than the start's plus ``tolerance`` nats, the
    score is ``val_robust_accuracy`` (in [0, 1]). Where it is worse, the score is below every
    such value: ``val_robust_accuracy - 1 - 10 * excess`` (excess: nats above the allowed loss),
    so a fine-tune that buys fewer-lead skill with 12-lead skill never outranks one that keeps
    it, and among those that do not, the search is pulled back towards the allowed loss."""
    excess = val_loss - (start_val_loss + tolerance)
    if excess <= 0:
        return robust_accuracy
    return robust_accuracy - 1.0 - 10.0 * excess
