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
    # Further objectives, each (metric, "min"|"max"), e.g. (("params", "min"),): the study is
    # multi-objective and keeps a Pareto front; the champion is still the best ``metric`` within
    # the --within budgets given (search.objectives).
    objectives: tuple[tuple[str, str], ...] = ()
    task: str = "lead_id"  # the task whose trainable the trials run (leadtune.trainables.tasks)
    # Config fields shown in the live trial table (only those every trial of the space has;
    # empty: the task's defaults).
    table_params: tuple[str, ...] = ()
    # Tune's scheduler unless --scheduler says otherwise: asha stops weak trials early
    # (hyperband: the same with 3 brackets of different grace; median: stop a trial below the
    # median of the others at the same point); fifo runs every trial to the end (a grid whose
    # every cell is a result, e.g. lead_subsets).
    scheduler: str = "asha"
    # The unit trials are compared in: "schedule" (percent of the trial's own epochs, so trials
    # with different epoch counts or schedules are judged at the same point of their schedule)
    # or "epoch".
    fidelity: str = "schedule"
    # When a trial is first judged, in that unit. None: a quarter of the schedule (25 %, or
    # epochs / 4). By then a cosine schedule is still above 85 % of its peak learning rate and
    # the trial has taken a quarter of its steps, so its rank reflects its settings; judging
    # after the first of 40 epochs (2.5 %) ranked trials by how fast they start.
    grace_period: float | None = None
    reduction_factor: int = 2  # each later rung is this many times further; keeps 1/factor


SCHEDULERS = ("asha", "hyperband", "median", "fifo")
FIDELITIES = ("schedule", "epoch")
SPACES: dict[str, SearchSpace] = {}
# What `leadtune search` and `leadtune promote` use when no --space / --study is given.
DEFAULT_SPACE = "lead_id"


def register_space(space: SearchSpace) -> SearchSpace:
    """Add a space under its name (a second space of the same name is an error)."""
    if space.name in SPACES:
        raise ValueError(f"a search space named {space.name!r} is already registered")
    if space.scheduler not in SCHEDULERS:
        raise ValueError(f"space {space.name!r}: scheduler must be one of {', '.join(SCHEDULERS)}")
    if space.fidelity not in FIDELITIES:
        raise ValueError(f"space {space.name!r}: fidelity must be schedule or epoch")
    if space.reduction_factor < 2:
        raise ValueError(f"space {space.name!r}: reduction_factor must be at least 2")
    if space.mode not in ("min", "max"):
        raise ValueError(f"space {space.name!r}: mode must be 'min' or 'max', got {space.mode!r}")
    for metric, mode in space.objectives:
        if mode not in ("min", "max") or metric == space.metric:
            raise ValueError(
                f"space {space.name!r}: objective ({metric!r}, {mode!r}) needs mode 'min' or "
                "'max' and a metric other than the primary"
            )
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
