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
import re
import sys
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


DELIVERIES: dict[str, Delivery] = {}


def register_delivery(delivery: Delivery) -> Delivery:
    """Register a task's delivery (a second one for the same task is an error)."""
    if delivery.task in DELIVERIES and DELIVERIES[delivery.task] is not delivery:
        raise ValueError(f"a delivery for task {delivery.task!r} is already registered")
    DELIVERIES[delivery.task] = delivery
    return delivery


def delivery_of(task: str) -> Delivery:
    """The task's registered delivery, or the default: its own evaluation and no sections."""
    return DELIVERIES.get(task) or Delivery(task, suites={"task": task_suite})


def choose_suite(task: str, asked: str | None) -> EvaluationSuite:
    suites = delivery_of(task).suites
    name = asked or next(iter(suites))
    if name not in suites:
        raise ValueError(
            f"--suite {name}: a {task} model is evaluated by {', '.join(suites)}; pass one of "
            "them or leave --suite out"
        )
    return suites[name]


# -- what the suites share --------------------------------------------------------------------


def slug(text: str) -> str:
    """A folder name for a model argument (``models:/lead-id@champion`` -> ``lead-id@champion``)."""
    return re.sub(r"[^A-Za-z0-9@._-]+", "_", text.replace("models:/", "")).strip("_") or "model"


def evaluation_out(args: argparse.Namespace, default_name: str, suffix: str = "") -> Path:
    """``--out``, else ``runs/evaluate/<model>-<split>[-suffix]``."""
    if args.out:
        return Path(args.out)
    name = f"{slug(str(args.model or default_name))}-{args.split}"
    return Path("runs/evaluate") / (f"{name}-{suffix}" if suffix else name)


def prepared_ptbxl(args: argparse.Namespace, loaded: Any) -> Any:
    """The PTB-XL folder a suite evaluates on (``--source``, else the model's training data when
    it is here, else the bundled sample), read with the model's own preprocessing."""
    from leadtune.trainables.commands import default_source
    from leadtune.trainables.data.ptbxl import database_files

    trained_on = loaded.card.get("data", {}).get("source") or ""
    source = args.source or (
        trained_on if trained_on and (Path(trained_on) / "ptbxl_database.csv").is_file()
        else default_source()
    )  # fmt: skip
    database_files(Path(source))  # a wrong folder is one line, before any other output
    print(
        f"[leadtune] evaluating {loaded.source} on the {args.split} split of {source}",
        file=sys.stderr,
    )
    return ptbxl_for_model(source, args.cache_dir, args.limit, loaded)


def ptbxl_for_model(source: str, cache_dir: str | None, limit: int | None, loaded: Any) -> Any:
    """A PTB-XL folder prepared (cached) with the model's own preprocessing."""
    from leadtune.trainables.data.cache import prepare_dataset
    from leadtune.trainables.data.preprocess import PreprocessConfig

    return prepare_dataset(
        Path(source),
        cache_root=Path(cache_dir) if cache_dir else None,
        preprocess=PreprocessConfig(**loaded.preprocess),
        limit=limit,
        progress=sys.stderr.isatty(),
    )


def refuse_compare(task: str, other: Any) -> None:
    if other is not None:
        raise ValueError(f"--compare is not a suite of {task} models; drop it")


def task_suite(args: argparse.Namespace, loaded: Any, other: Any) -> int:
    """A task's own evaluation (``TaskSpec.evaluate``, the one promotion runs) on ``--source``."""
    from leadtune.analysis.task_evaluation import evaluate_with_task, format_markdown, write
    from leadtune.trainables.tasks import DataRequest

    refuse_compare(loaded.task, other)
    if args.source is None:
        raise ValueError(f"a {loaded.task} model needs --source: the data its task reads")
    request = DataRequest(
        source=Path(args.source), cache_dir=args.cache_dir, limit=args.limit,
        progress=sys.stderr.isatty(),
    )  # fmt: skip
    result = evaluate_with_task(loaded, request, args.split)
    files = write(result, evaluation_out(args, "model"))
    print(format_markdown(result))
    print(f"written: {files['markdown']}, {files['json']}")
    return 0
