"""What a task adds to the delivery commands, and the task-neutral parts they share.

A task's ``delivery`` package (``trainables/<task>/delivery/``) registers a :class:`Delivery`:
its ``leadtune evaluate`` suites and its sections of ``leadtune report``; it may add commands of
its own (lead identification adds ``leadtune label``). The delivery packages sit on top of
everything (they use this package, the model loading and the search's results), so nothing
below imports them: the ``leadtune`` command imports the built-in ones (``leadtune/cli.py``),
and a task of one's own registers its delivery from its ``LEADTUNE_TASKS`` module. A task
without one gets :func:`task_suite`: its own evaluation, the one promotion runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# (arguments of leadtune evaluate, the loaded model, the --compare model or None) -> exit status
EvaluationSuite = Callable[[argparse.Namespace, Any, Any], int]
# (the report's collected search data, the report folder) -> None; prints what it wrote
ReportSection = Callable[[Any, Path], None]


@dataclass(frozen=True)
class Explainer:
    """A task's part in ``leadtune explain`` (:mod:`leadtune.analysis.explain`): the attribution
    methods it offers, and what it attributes and draws for one record and over a split."""

    methods: tuple[str, ...]
    record: Callable[[Any], list[Path]]  # (explain.RecordRun) -> files written
    split: Callable[[Any], list[Path]]  # (explain.SplitRequest) -> files written
    # (prepared dataset, a split's rows) -> the rows to explain (None: all of them)
    keep_rows: Callable[[Any, Any], Any] | None = None


@dataclass(frozen=True)
class Delivery:
    task: str
    # leadtune evaluate --suite NAME -> how it runs; the first is the default
    suites: dict[str, EvaluationSuite] = field(default_factory=dict)
    report_sections: tuple[ReportSection, ...] = ()
    explainer: Explainer | None = None  # leadtune explain (None: not offered)
    compare: tuple[str, ...] = ()  # the suites that take a second model (--compare)


DELIVERIES: dict[str, Delivery] = {}


def register_delivery(delivery: Delivery) -> Delivery:
    """Register a task's delivery (a second one for the same task is an error)."""
    from leadtune.trainables.tasks import register_once

    return register_once(DELIVERIES, delivery.task, delivery, "a delivery for task")


def delivery_of(task: str) -> Delivery:
    """The task's registered delivery, or the default: its own evaluation and no sections."""
    if task in DELIVERIES:
        return DELIVERIES[task]
    from leadtune.analysis.task_evaluation import task_suite

    return Delivery(task, suites={"task": task_suite})


NOT_REGISTERED = (
    "no delivery is registered for {task} models here: the leadtune command registers the "
    "built-in ones; from Python, import leadtune.cli (or the task's delivery package) first"
)


def choose_suite(task: str, asked: str | None, compare: bool = False) -> EvaluationSuite:
    """The suite ``--suite`` names (default: the task's first); a one-line error, before any
    model or data is read, for a suite the task lacks or a ``--compare`` it does not take."""
    delivery = delivery_of(task)
    name = asked or next(iter(delivery.suites))
    if name not in delivery.suites:
        hint = "" if task in DELIVERIES else f" ({NOT_REGISTERED.format(task=task)})"
        raise ValueError(
            f"--suite {name}: a {task} model is evaluated by {', '.join(delivery.suites)}; "
            f"pass one of them or leave --suite out{hint}"
        )
    if compare and name not in delivery.compare:
        takes = f"only its {', '.join(delivery.compare)} suite" if delivery.compare else "none"
        raise ValueError(
            f"--compare: of a {task} model's suites, {takes} compares two models; drop it"
        )
    return delivery.suites[name]
