"""Registers the lead-identification trainable: data loading, test evaluation and model loading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from trainables.registry import DataRequest, TrainableSpec, register_trainable


def load_data(request: DataRequest) -> tuple[Any, Any]:
    from trainables.data.cache import prepare_dataset
    from trainables.lead_id import LeadIdData

    dataset = prepare_dataset(
        Path(request.source),
        cache_root=request.cache_dir,
        limit=request.limit,
        progress=request.progress,
    )
    return LeadIdData.from_prepared(dataset), dataset


def evaluate(checkpoint_dir: Path, dataset: Any, split: str = "test") -> dict[str, Any]:
    from trainables.lead_id import evaluate_checkpoint

    return evaluate_checkpoint(checkpoint_dir, dataset, split=split)


def load_model(checkpoint_dir: Path) -> tuple[Any, dict[str, Any], np.ndarray]:
    from trainables.lead_id import load_model_from_checkpoint

    model, config, state = load_model_from_checkpoint(checkpoint_dir)
    fs = int(state.get("data", {}).get("fs", 100))
    rng = np.random.default_rng(0)
    example = (0.1 * rng.standard_normal((1, len(config.leads), 10 * fs))).astype(np.float32)
    return model, config.to_dict(), example


def train(config: dict[str, Any], data: Any, reporter: Any = None) -> dict[str, Any]:
    from trainables.lead_id import train_lead_id

    return train_lead_id(config, data=data, reporter=reporter)


register_trainable(
    TrainableSpec(
        name="lead_id",
        train=train,
        load_data=load_data,
        evaluate=evaluate,
        load_model=load_model,
        description="ECG lead identification (per-lead encoder, set context, per-lead head)",
    )
)
