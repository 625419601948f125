"""The data a diagnosis trial holds in memory (no torch: the search's driver builds it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from leadtune.trainables.split_data import SplitData


@dataclass(kw_only=True)
class DiagnosisData(SplitData):
    """The labelled records of the training and validation splits (:class:`SplitData`) and
    their superclass labels, (N, 5) float32. Records without any superclass are left out."""

    train_labels: np.ndarray
    val_labels: np.ndarray

    @classmethod
    def from_prepared(cls, dataset: Any) -> DiagnosisData:
        rows = {split: labelled_rows(dataset, split) for split in ("train", "val")}
        return cls(
            **cls.split_fields(dataset, rows["train"], rows["val"]),
            train_labels=dataset.superclasses[rows["train"]].astype(np.float32),
            val_labels=dataset.superclasses[rows["val"]].astype(np.float32),
        )


def labelled_rows(dataset: Any, split: str) -> np.ndarray:
    """Rows of a split whose record has at least one diagnostic superclass."""
    rows = dataset.indices(split)
    return rows[np.asarray(dataset.superclasses)[rows].any(axis=1)]
