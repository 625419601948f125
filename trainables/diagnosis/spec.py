"""Registers diagnosis as a task: what search, promotion and the delivery commands need to know
about it (see :class:`leadtune.trainables.tasks.TaskSpec`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from leadtune.trainables.diagnosis.config import DiagnosisConfig, resolve_leads
from leadtune.trainables.diagnosis.data import DiagnosisData
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
    from leadtune.trainables.diagnosis import train

    return train


def build_model(config: DiagnosisConfig) -> Any:
    from leadtune.trainables.diagnosis.models import create_model

    return create_model(config)


def example_input(config: DiagnosisConfig, fs: int) -> np.ndarray:
    """One window (or 10 s) of noise at 0.1 mV on the configured leads."""
    samples = round((config.window_s or 10) * fs)
    rng = np.random.default_rng(0)
    return (0.1 * rng.standard_normal((1, len(resolve_leads(config.leads)), samples))).astype(
        np.float32
    )


def train(
    config: dict[str, Any], data: Any, reporter: Any = None, progress: bool = False
) -> dict[str, Any]:
    from leadtune.trainables.diagnosis.train import train_diagnosis

    return train_diagnosis(config, data=data, reporter=reporter, progress=progress)


# The networks' sizes in their sources (12 leads, 5 outputs; DIAGNOSIS_NOTES.md).
PUBLISHED_PARAMETERS = {
    "resnet1d_wang": (473_349, "PTB-XL benchmark"),
    "inception1d": (507_653, "PTB-XL benchmark"),
    "xresnet1d": (1_872_261, "PTB-XL benchmark (depth 101)"),
    "lead_minimal": (1_018_181, "Lead-Minimal ECG (4 blocks, as its train.py calls it)"),
    "resnet34_1d": (16_606_085, "ecg-diagnosis ResNet-34"),
    "ecg_xplaim": (3_531_557, "ECG-XPLAIM"),
}


def describe_models(d_model: int) -> list[dict[str, Any]]:
    """The six networks at 12 leads and 5 classes (``d_model`` does not apply)."""
    from leadtune.trainables.diagnosis.models import count_parameters, create_model

    return [
        {
            "kind": "diagnosis",
            "name": name,
            "parameters": count_parameters(create_model(DiagnosisConfig(model=name))),
            "published_parameters": published,
            "description": source,
        }
        for name, (published, source) in PUBLISHED_PARAMETERS.items()
    ]


def predict(model: Any, config: DiagnosisConfig, fs: int, signals: np.ndarray) -> np.ndarray:
    """(B, leads, T) mV -> (B, 5) probabilities, by the evaluation's sliding windows."""
    import torch

    from leadtune.trainables.diagnosis.train import predict_probabilities

    with torch.inference_mode():
        return predict_probabilities(
            model, np.asarray(signals, dtype=np.float32), config, fs, torch.device("cpu")
        ).astype(np.float32)


SPEC = register_task(
    TaskSpec(
        name="diagnosis",
        description="multi-label PTB-XL diagnostic superclasses (NORM, MI, STTC, CD, HYP)",
        config_class=DiagnosisConfig,
        train=train,
        load_data=ptbxl_loader(DiagnosisData),
        evaluate=deferred(lambda: _train().evaluate_checkpoint),
        paired_test=deferred(lambda: _train().paired_test),
        build_model=build_model,
        example_input=example_input,
        predict=predict,
        predict_output="probabilities (batch, 5) of NORM, MI, STTC, CD, HYP (multi-label; "
        "each record's sliding windows aggregated as in evaluation)",
        export_output="logits of NORM, MI, STTC, CD, HYP (multi-label: a sigmoid gives each "
        "probability) for the window given; leadtune's own predictions average the sigmoids "
        "of a record's sliding windows",
        input_scaling="none outside the network: its first layer standardises each lead with "
        "the training split's mean and standard deviation",
        register_name="ecg-diagnosis",
        table_metrics=(
            Column("val_macro_auroc", "auroc"),
            Column("val_macro_f1", "f1"),
            Column("val_brier", "brier"),
        ),  # fmt: skip
        test_metrics=(
            Column("test_macro_auroc", "test macro AUROC"),
            Column("test_macro_f1", "test macro F1"),
            Column("test_brier", "test Brier"),
        ),
        table_params=("model", "leads", "lr"),
        metric="val_macro_auroc",
        mode="max",
        variable_leads=False,
        check_data=ptbxl_source_check,
        describe_models=describe_models,
        models_note="published: counted on the sources' own layouts (../shared/DIAGNOSIS_NOTES.md).",
    )
)
