"""`leadtune evaluate` for a task without a suite of its own (a task added through
``LEADTUNE_TASKS``): the task's own test evaluation, the one promotion runs
(:attr:`TaskSpec.evaluate`), on the model as loaded, on the data the task's ``load_data`` reads.
Written as ``evaluation.json`` and ``evaluation.md`` in ``--out``."""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

from leadtune.trainables.tasks import DataRequest, get_task


def evaluate_with_task(loaded: Any, request: DataRequest, split: str) -> dict[str, Any]:
    """The task's metrics of ``loaded`` on ``split`` of the data ``request`` names."""
    from leadtune.trainables.training import save_checkpoint

    spec = get_task(loaded.task)
    if spec.check_data is not None:
        spec.check_data(request)  # a wrong source is one line, before the data is read
    _, dataset = spec.load_data(request)
    with tempfile.TemporaryDirectory(prefix="leadtune-evaluate-") as tmp:
        # the task's evaluate reads a checkpoint: the loaded model's weights and config as one
        save_checkpoint(
            Path(tmp),
            {"task": loaded.task, "config": loaded.config_dict(),
             "model": loaded.model.state_dict(), "data": dict(loaded.card.get("data") or {})},
        )  # fmt: skip
        found = spec.evaluate(Path(tmp), dataset, split)
    return {
        "task": loaded.task,
        "model": loaded.source,
        "split": split,
        "data": str(request.source),
        "metrics": {k: v for k, v in found.items() if _plain(v)},
    }


def _plain(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def format_markdown(result: dict[str, Any]) -> str:
    spec = get_task(result["task"])
    labels = {column.key: column.label for column in spec.test_metrics}
    lines = [
        f"# {result['model']} on the {result['split']} split ({result['task']})",
        "",
        f"Data: {result['data']}; the task's own evaluation (the one promotion runs).",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for key, value in result["metrics"].items():
        shown = f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else value
        lines.append(f"| {labels.get(key, key)} | {shown} |")
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], out: Path) -> dict[str, Path]:
    from leadtune.analysis.suites import write_result

    return write_result(out, "evaluation", result, format_markdown(result))


def task_suite(args: argparse.Namespace, loaded: Any, other: Any) -> int:
    """A task's own evaluation (``TaskSpec.evaluate``, the one promotion runs) on ``--source``."""
    from leadtune.analysis.suites import evaluation_out

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
