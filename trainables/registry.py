"""Trainables by name: what ``search`` needs to run, evaluate and publish a task's models.

``search`` knows nothing of ECGs; it asks a :class:`TrainableSpec` for everything task-specific.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DataRequest:
    """Which dataset a search or evaluation uses (the CLI's data flags)."""

    source: Path
    cache_dir: str | None = None
    limit: int | None = None
    progress: bool = True


@dataclass(frozen=True)
class TrainableSpec:
    name: str
    # (config, data, reporter=None) -> last metrics; reports every epoch through Tune.
    train: Callable[..., dict[str, Any]]
    # DataRequest -> (what every trial gets through the object store, the prepared dataset).
    load_data: Callable[[DataRequest], tuple[Any, Any]]
    # (checkpoint folder, prepared dataset, split) -> metrics on that split.
    evaluate: Callable[[Path, Any, str], dict[str, Any]]
    # checkpoint folder -> (torch model in eval mode, config dict, an input example array).
    load_model: Callable[[Path], tuple[Any, dict[str, Any], Any]]
    description: str = ""


TRAINABLES: dict[str, TrainableSpec] = {}


def register_trainable(spec: TrainableSpec) -> TrainableSpec:
    TRAINABLES[spec.name] = spec
    return spec


def get_trainable(name: str) -> TrainableSpec:
    if not TRAINABLES:
        import trainables.lead_id_spec  # noqa: F401  (registers the built-in trainables)
    try:
        return TRAINABLES[name]
    except KeyError:
        raise ValueError(
            f"unknown trainable {name!r}; known: {', '.join(sorted(TRAINABLES))}"
        ) from None
