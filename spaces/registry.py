"""The space registry: a name -> :class:`SearchSpace` mapping that users extend in plain Python."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# An Optuna define-by-run function: it calls trial.suggest_*() for what varies (conditionally,
# if need be) and returns a dict of constants to merge into the trial's config (or None).
DefineByRun = Callable[[Any], dict[str, Any] | None]


@dataclass(frozen=True)
class SearchSpace:
    """What a search may vary, what it keeps fixed, and what it optimises."""

    name: str
    define: DefineByRun
    description: str = ""
    # Settings given to every trial (e.g. few records for a smoke run); CLI flags override them.
    fixed: dict[str, Any] = field(default_factory=dict)
    # Parameter sets evaluated before the sampler takes over (e.g. the reference model).
    initial_points: tuple[dict[str, Any], ...] = ()
    metric: str = "val_loss"
    mode: str = "min"
    task: str = "lead_id"  # the task whose trainable the trials run (leadtune.trainables.tasks)
    # Config fields shown in the live trial table (only those every trial of the space has;
    # empty: the task's defaults).
    table_params: tuple[str, ...] = ()
    # Tune's scheduler unless --scheduler says otherwise: asha stops weak trials early; fifo
    # runs every trial to the end (a grid whose every cell is a result, e.g. lead_subsets).
    scheduler: str = "asha"


SPACES: dict[str, SearchSpace] = {}
# What `leadtune search` and `leadtune promote` use when no --space / --study is given.
DEFAULT_SPACE = "lead_id"


def register_space(space: SearchSpace) -> SearchSpace:
    """Add a space under its name (a second space of the same name is an error)."""
    if space.name in SPACES:
        raise ValueError(f"a search space named {space.name!r} is already registered")
    if space.scheduler not in ("asha", "fifo"):
        raise ValueError(f"space {space.name!r}: scheduler must be asha or fifo")
    if space.mode not in ("min", "max"):
        raise ValueError(f"space {space.name!r}: mode must be 'min' or 'max', got {space.mode!r}")
    SPACES[space.name] = space
    return space


def get_space(name: str) -> SearchSpace:
    try:
        return SPACES[name]
    except KeyError:
        raise ValueError(
            f"unknown search space {name!r}; known: {', '.join(sorted(SPACES))} "
            "(add one with spaces.register_space)"
        ) from None
