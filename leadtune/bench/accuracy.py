"""Accuracy: the fast and the plain model trained side by side on the same batches
(``leadtune bench --accuracy``)."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

# --- accuracy: fast vs plain training ----------------------------------------------------------

ACCURACY_CONFIG = {
    # the reference architecture, narrowed so that a few epochs run in minutes on a CPU
    "width": 0.5,
    "d_model": 64,
    "depth": 2,
    "heads": 4,
    "batch_size": 32,
    "lr": 2e-3,
    "epochs": 3,
    "max_train_records": 400,
    "max_val_records": 200,
    "seed": 0,
}


def with_artefacts_first(data: Any, count: int) -> tuple[Any, dict[str, Any]]:
    """The training records sorted so that the ``count`` kept hold every record above 5 mV
    (pacemaker spikes, electrode pops, saturation): the fast path must agree with the plain one
    on what real data holds, not on a clean sample."""

    import numpy as np

    peaks = np.abs(data.train).max(axis=(1, 2))
    loud = np.flatnonzero(peaks > 5.0)
    order = np.concatenate([loud, np.setdiff1d(np.arange(len(peaks)), loud)])[:count]
    ids = data.ids("train", order)
    chosen = dataclasses.replace(data, train=data.train[order], train_ids=ids)
    facts = {
        "records": int(len(order)),
        "above_5_mv": int((peaks[order] > 5).sum()),
        "above_10_mv": int((peaks[order] > 10).sum()),
        "largest_peak_mv": round(float(peaks[order].max()), 2),
        "largest_peak_ecg_id": int(ids[int(np.argmax(peaks[order]))]),
    }
    return chosen, facts


def compare_training(data: Any, config: dict[str, Any], log: Any) -> dict[str, Any]:
    """Train the fast model and the plain rendering from the same seed on the same batches,
    on real records that include the data's artefacts."""
    from leadtune.trainables.lead_id.models.plain_reference import create_plain_model
    from leadtune.trainables.lead_id.train import train_lead_id
    from leadtune.trainables.training import LocalReporter

    data, facts = with_artefacts_first(data, config["max_train_records"])
    log(f"  training records: {json.dumps(facts)}")
    histories = {}
    for variant, build in (("fast", None), ("plain", create_plain_model)):
        log(f"  training the {variant} model: {json.dumps(config)}")
        with tempfile.TemporaryDirectory(prefix="leadtune-bench-accuracy-") as tmp:
            reporter = LocalReporter(Path(tmp))
            train_lead_id(config, data, reporter, build_model=build)
            histories[variant] = [{key: m[key] for key in ACCURACY_KEYS} for m in reporter.history]
    return {"config": config, "training_records": facts, **histories}


ACCURACY_KEYS = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_lead_accuracy",
    "val_set_accuracy",
    "epoch_seconds",
)
