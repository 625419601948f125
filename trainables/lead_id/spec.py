"""Registers lead identification as a task: what search, promotion and the delivery commands
need to know about it (see :class:`leadtune.trainables.tasks.TaskSpec`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from leadtune.trainables.lead_id.config import LeadIdConfig
from leadtune.trainables.lead_id.data import LeadIdData
from leadtune.trainables.tasks import (
    Column,
    TaskSpec,
    deferred,
    ptbxl_loader,
    ptbxl_source_check,
    register_task,
)


def _train() -> Any:
    """The training module (it imports torch), on first use."""
    from leadtune.trainables.lead_id import train

    return train


def build_model(config: LeadIdConfig) -> Any:
    from leadtune.trainables.lead_id.models import create_model

    return create_model(config.model_config())


def example_input(config: LeadIdConfig, fs: int) -> np.ndarray:
    """Ten seconds of noise at 0.1 mV on each of the model's leads, (1, K, 10 fs) float32."""
    rng = np.random.default_rng(0)
    return (0.1 * rng.standard_normal((1, len(config.leads), 10 * fs))).astype(np.float32)


def train(
    config: dict[str, Any], data: Any, reporter: Any = None, progress: bool = False
) -> dict[str, Any]:
    from leadtune.trainables.lead_id.train import train_lead_id

    return train_lead_id(config, data=data, reporter=reporter, progress=progress)


def describe_models(d_model: int) -> list[dict[str, Any]]:
    from leadtune.trainables.lead_id.models import describe_models as rows

    return rows(d_model=d_model)


def predict(model: Any, config: LeadIdConfig, fs: int, signals: np.ndarray) -> np.ndarray:
    """(B, K, T) mV -> (B, K, 12) log-probabilities over the 12 lead names."""
    import torch

    with torch.inference_mode():
        logits = model(torch.from_numpy(np.ascontiguousarray(signals, dtype=np.float32)))
    return logits.float().log_softmax(-1).numpy()


SPEC = register_task(
    TaskSpec(
        name="lead_id",
        description="ECG lead identification (per-lead encoder, set context, per-lead head)",
        config_class=LeadIdConfig,
        train=train,
        load_data=ptbxl_loader(LeadIdData),
        evaluate=deferred(lambda: _train().evaluate_checkpoint),
        paired_test=deferred(lambda: _train().paired_test),
        build_model=build_model,
        example_input=example_input,
        predict=predict,
        predict_output="log-probabilities (batch, K, 12) of each input lead being I, II, III, "
        "aVR, aVL, aVF, V1, ..., V6 (in that order)",
        export_output="unnormalised log-probabilities over the lead labels, in the order of "
        "'leads'; label a recording injectively with the Hungarian method on the log-softmax "
        "(scipy.optimize.linear_sum_assignment(..., maximize=True))",
        input_scaling="none (amplitude is a cue to the lead)",
        register_name="lead-id",
        table_metrics=(
            Column("val_lead_accuracy_hungarian", "lead_acc"),
            Column("val_set_accuracy_hungarian", "set_acc"),
        ),
        test_metrics=(
            Column("test_lead_accuracy_hungarian", "test lead accuracy (Hungarian)"),
            Column("test_set_accuracy_hungarian", "test set accuracy (Hungarian)"),
            Column("test_lead_accuracy", "test lead accuracy (argmax)"),
        ),
        table_params=("encoder", "context", "d_model", "lr", "batch_size"),
        # with robust_validation: fewer leads and noise; with init_from too, the fine-tuning
        # score (see trainables/lead_id/robustness.py)
        val_metrics=(
            "val_lead_accuracy",
            "val_set_accuracy",
            "val_robust_accuracy",
            "val_finetune_score",
        ),  # fmt: skip
        check_data=ptbxl_source_check,
        describe_models=describe_models,
        models_note=(
            "published: Table VI of the paper (encoders at D = 128), the released code "
            "(reference model)."
        ),
        models_use_d_model=True,
    )
)
