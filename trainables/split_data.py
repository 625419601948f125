"""The in-memory data of a trial, shared by every task (:class:`SplitData`): numpy only, so the
search's driver, which loads the data once and hands it to the trials, imports no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from leadtune.trainables.data.leads import LEADS as ALL_LEADS


@dataclass
class SplitData:
    """What a trial trains and validates on, held in memory: the training and validation
    signals, (N, leads, T) float32 in mV, their sampling rate, the data fingerprint and the ECG
    ids of their rows (for errors that name records). Each task's data class adds its own
    arrays (diagnosis: the superclass labels).

    The test fold is deliberately absent: it is used once, on the chosen model, by promotion.
    """

    train: np.ndarray
    val: np.ndarray
    fs: int
    fingerprint: str
    leads: tuple[str, ...] = ALL_LEADS
    source: str = ""
    train_ids: np.ndarray | None = None
    val_ids: np.ndarray | None = None

    @staticmethod
    def split_fields(dataset: Any, train: np.ndarray, val: np.ndarray) -> dict[str, Any]:
        """The shared fields for rows ``train`` and ``val`` of a prepared dataset."""
        return {
            "train": np.ascontiguousarray(dataset.signals[train]),
            "val": np.ascontiguousarray(dataset.signals[val]),
            "fs": int(dataset.fs),
            "fingerprint": str(dataset.fingerprint),
            "leads": tuple(dataset.leads),
            "source": str(dataset.manifest.get("source", "")),
            "train_ids": dataset.ecg_ids[train],
            "val_ids": dataset.ecg_ids[val],
        }

    def ids(self, split: str, rows: np.ndarray | None = None) -> np.ndarray:
        """ECG ids of rows of a split (row numbers where the data came without ids)."""
        ids = self.train_ids if split == "train" else self.val_ids
        n = len(self.train if split == "train" else self.val)
        ids = np.arange(n) if ids is None else np.asarray(ids)
        return ids if rows is None else ids[rows]
