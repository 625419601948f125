"""Diagnosis spaces: ``diagnosis`` (model family, size, optimiser, regularisation, window),
``diagnosis_smoke`` (the same shape, tiny: tests and demos), and ``lead_subsets`` (one fixed
recipe trained on every lead configuration of Lead-Minimal's table with two seeds: the "how few
leads do you need?" study; ``leadtune report`` turns it into that table).

All select on the validation split's macro AUROC.
"""

from __future__ import annotations

from itertools import product
from typing import Any

from leadtune.spaces.registry import SearchSpace, register_space

MODELS = ("resnet1d_wang", "inception1d", "xresnet1d", "lead_minimal", "resnet34_1d", "ecg_xplaim")
# The lead configurations of Lead-Minimal's table, 12 leads first (the reference of the
# retention and LRS columns).
LEAD_SUBSETS = ("12", "limb6", "I-II-V2", "I-II-III", "II-V2-V5", "I-II", "II-V2", "II", "V2",
                "I", "V5")  # fmt: skip
STUDY_SEEDS = (0, 1)
# The order the grid is queued in: a spread of lead counts first, so a study cut short (e.g.
# --trials 12) still spans 12 leads down to one.
STUDY_ORDER = ("12", "I-II-V2", "I-II", "II", "V5", "limb6", "I-II-III", "II-V2-V5", "II-V2", "I",
               "V2")  # fmt: skip
BENCHMARK_POINT: dict[str, Any] = {
    "model": "resnet1d_wang", "width": 1.0, "lr": 1e-2, "weight_decay": 1e-2,
    "schedule": "onecycle", "window_s": 2.5, "label_smoothing": 0.0, "mixup_alpha": 0.0,
}  # fmt: skip


def suggest_recipe(trial: Any, models: tuple[str, ...], widths: tuple[float, ...]) -> dict:
    model = trial.suggest_categorical("model", list(models))
    chosen: dict[str, Any] = {
        "model": model,
        "width": trial.suggest_categorical("width", list(widths)),
        "lr": trial.suggest_float("lr", 1e-4, 3e-2, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-5, 1e-1, log=True),
        "schedule": trial.suggest_categorical("schedule", ["onecycle", "cosine"]),
        "window_s": trial.suggest_categorical("window_s", [2.5, 5.0]),
        "label_smoothing": trial.suggest_categorical("label_smoothing", [0.0, 0.1]),
        "mixup_alpha": trial.suggest_categorical("mixup_alpha", [0.0, 0.2]),
    }
    if model == "xresnet1d":
        chosen["depth"] = trial.suggest_categorical("depth", [18, 34, 50, 101])
    if model == "lead_minimal":
        chosen["stochastic_depth"] = trial.suggest_float("stochastic_depth", 0.0, 0.3)
    return chosen


def diagnosis_space(trial: Any) -> dict[str, Any]:
    return suggest_recipe(trial, MODELS, (0.5, 1.0))


def diagnosis_smoke_space(trial: Any) -> dict[str, Any]:
    # cheap models at a quarter width; ResNet-34 (16.6 M parameters) is left out
    return suggest_recipe(trial, ("resnet1d_wang", "inception1d", "lead_minimal"), (0.25,))


def lead_subsets_space(trial: Any) -> dict[str, Any]:
    # Every (configuration, seed) pair is queued as an initial point, so the study is a grid;
    # the sampler never needs to choose.
    return {
        "leads": trial.suggest_categorical("leads", list(LEAD_SUBSETS)),
        "seed": trial.suggest_categorical("seed", list(STUDY_SEEDS)),
    }


register_space(
    SearchSpace(
        name="diagnosis",
        define=diagnosis_space,
        description="diagnosis networks of the seeds and the PTB-XL benchmark: model, width, "
        "optimiser, schedule, window, regularisation",
        initial_points=(BENCHMARK_POINT,),
        metric="val_macro_auroc",
        mode="max",
        task="diagnosis",
        table_params=("model", "lr", "window_s"),
    )
)

register_space(
    SearchSpace(
        name="diagnosis_smoke",
        define=diagnosis_smoke_space,
        description="the diagnosis shape with quarter-width models and few epochs: tests, demos",
        fixed={"epochs": 3, "batch_size": 64},
        initial_points=({**BENCHMARK_POINT, "width": 0.25},),
        metric="val_macro_auroc",
        mode="max",
        task="diagnosis",
        table_params=("model", "lr", "window_s"),
    )
)

register_space(
    SearchSpace(
        name="lead_subsets",
        define=lead_subsets_space,
        description="Lead-Minimal's network and recipe on each of its 11 lead configurations, "
        "two seeds: how few leads does a diagnosis need?",
        fixed={
            "model": "lead_minimal",
            "lr": 1e-3,
            "weight_decay": 1e-2,
            "schedule": "cosine",
            "label_smoothing": 0.1,  # its targets y * 0.9 + 0.05
            "mixup_alpha": 0.2,
            "epochs": 30,
            "batch_size": 128,
        },  # fmt: skip
        initial_points=tuple(
            {"leads": leads, "seed": seed} for leads, seed in product(STUDY_ORDER, STUDY_SEEDS)
        ),
        metric="val_macro_auroc",
        mode="max",
        task="diagnosis",
        table_params=("leads", "seed"),
        scheduler="fifo",  # every configuration trained to the end: the table needs them all
    )
)
