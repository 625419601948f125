"""A toy task, a few lines and no ECGs: fit y = 2x with a one-weight linear model.

It goes through everything a real task does (a config dataclass, a training function that
reports and checkpoints through leadtune's reporter, data with a fingerprint, test evaluation, a
model built from its config) so that a test can run it through a real search, MLflow and
promotion: the proof that search names no task. Importing it registers the task ``toy`` and the
space ``toy``; trial workers import it through ``LEADTUNE_TASKS=toy_task``.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leadtune.spaces import SPACES, SearchSpace, register_space
from leadtune.trainables.tasks import TASKS, Column, TaskSpec, register_task
from leadtune.trainables.training import (
    LocalReporter,
    StepGuard,
    TuneReporter,
    load_checkpoint,
    save_checkpoint,
)


@dataclass
class ToyConfig:
    slope: float = 0.0  # the weight the model starts from
    lr: float = 0.1
    epochs: int = 3
    poison: bool = False  # a non-finite loss in epoch 2: the guard must stop the trial
    seed: int = 0
    num_threads: int | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ToyConfig:
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown training setting(s) {', '.join(sorted(unknown))}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ToyData:
    x: np.ndarray
    y: np.ndarray
    fingerprint: str = "toy-data-v1"


def load_data(request: Any) -> tuple[ToyData, ToyData]:
    x = np.linspace(-1, 1, 32, dtype=np.float32)
    data = ToyData(x, 2 * x)
    return data, data


def build_model(config: ToyConfig) -> torch.nn.Module:
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(config.slope)
    return model


def train(config: dict[str, Any], data: ToyData, reporter: Any = None, progress: bool = False):
    cfg = ToyConfig.from_dict(config)
    reporter = reporter or TuneReporter()
    model = build_model(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    start = 0
    if (resumed := reporter.latest_checkpoint()) is not None:
        state = load_checkpoint(resumed)
        model.load_state_dict(state["model"])
        start = state["epoch"]
    x, y = torch.from_numpy(data.x)[:, None], torch.from_numpy(data.y)[:, None]
    guard = StepGuard()
    last = {}
    for epoch in range(start, cfg.epochs):
        loss = ((model(x) - y) ** 2).mean()
        if cfg.poison and epoch == 1:
            loss = loss * float("inf")
        optimizer.zero_grad()
        loss.backward()
        guard.step_is_finite(loss, list(model.parameters()), epoch + 1, 1, [0])
        optimizer.step()
        with torch.no_grad():
            val_loss = float(((model(x) - y) ** 2).mean())
        last = {"epoch": epoch + 1, "val_loss": val_loss, "val_slope": float(model.weight)}
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(
                Path(tmp),
                {"task": "toy", "model": model.state_dict(), "config": cfg.to_dict(),
                 "epoch": epoch + 1, "metrics": last, "data": {"fingerprint": data.fingerprint}},
            )  # fmt: skip
            reporter.report(dict(last), Path(tmp))
    return last


def evaluate(checkpoint: Path, dataset: ToyData, split: str = "test") -> dict[str, Any]:
    state = load_checkpoint(checkpoint)
    model = build_model(ToyConfig.from_dict(state["config"]))
    model.load_state_dict(state["model"])
    x, y = torch.from_numpy(dataset.x)[:, None], torch.from_numpy(dataset.y)[:, None]
    with torch.no_grad():
        return {f"{split}_loss": float(((model(x) - y) ** 2).mean())}


def example_input(config: ToyConfig, fs: int) -> np.ndarray:
    return np.ones((1, 1, 1), dtype=np.float32)


def toy_space(trial: Any) -> dict[str, Any]:
    # The study's first trial is poisoned: its loss turns non-finite in epoch 2.
    return {
        "slope": trial.suggest_float("slope", -1.0, 3.0),
        "lr": trial.suggest_float("lr", 0.1, 0.4),
        "poison": trial.number == 0,
    }


if "toy" not in TASKS:
    register_task(
        TaskSpec(
            name="toy",
            description="fit y = 2x (tests: a task that is not lead identification)",
            config_class=ToyConfig,
            train=train,
            load_data=load_data,
            evaluate=evaluate,
            build_model=build_model,
            example_input=example_input,
            register_name="toy-model",
            table_metrics=(Column("val_slope", "slope"),),
            test_metrics=(Column("test_loss", "test loss"),),
            table_params=("slope", "lr"),
            variable_leads=False,
        )
    )
if "toy" not in SPACES:
    register_space(
        SearchSpace(
            name="toy",
            define=toy_space,
            description="slope and learning rate of the toy task",
            fixed={"epochs": 3},
            initial_points=({"slope": 0.0, "lr": 0.2},),
            task="toy",
        )
    )

__all__ = ["LocalReporter", "ToyConfig", "train"]
