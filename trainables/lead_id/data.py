"""The data a lead-ID trial holds in memory (no torch: the search's driver builds it)."""

from __future__ import annotations

from typing import Any

from leadtune.trainables.split_data import SplitData


class LeadIdData(SplitData):
    """The arrays a lead-ID trial needs (:class:`SplitData`): the training and validation
    signals and their ECG ids."""

    @classmethod
    def from_prepared(cls, dataset: Any) -> LeadIdData:
        """Load the train and val splits of a :class:`PreparedDataset` into memory once."""
        return cls(**cls.split_fields(dataset, dataset.indices("train"), dataset.indices("val")))
