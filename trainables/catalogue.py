"""``leadtune models``: each task's models with their parameter counts (lead identification's
encoders and contexts, the diagnosis networks), against the published sizes.

Imports nothing heavy at module level (torch loads inside the command), so building the CLI
parser stays fast.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(subparsers: Any) -> None:
    from leadtune.trainables.commands import DefaultsHelpFormatter, positive_int

    parser = subparsers.add_parser(
        "models",
        help="list each task's models with parameter counts",
        description=(
            "lead_id: the registered per-lead encoders and lead contexts with their parameter "
            "counts at feature width D, and the reference model's total (inception_gru + 5 set "
            "attention blocks), encoders compared with the paper's Table VI at D = 128. "
            "diagnosis: the six networks for 12 leads and 5 classes, compared with the counts "
            "of their sources."
        ),
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument(
        "--task",
        default="lead_id",
        help="the task whose models to list (lead_id, diagnosis, or one added by LEADTUNE_TASKS)",
    )
    parser.add_argument(
        "--d-model",
        type=positive_int,
        default=128,
        help="lead_id: feature width D the counts are computed at (a multiple of the 8 heads)",
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.set_defaults(func=run_models)


def run_models(args: argparse.Namespace) -> int:
    from leadtune.trainables.tasks import get_task

    spec = get_task(args.task)
    if spec.describe_models is None:
        raise SystemExit(f"leadtune models: task {spec.name!r} lists no models")
    rows = spec.describe_models(args.d_model)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(format_table(rows, args.d_model if spec.models_use_d_model else None, spec.models_note))
    return 0


def format_table(rows: list[dict[str, Any]], d_model: int | None, note: str = "") -> str:
    header = ("kind", "name", f"params (D={d_model})" if d_model else "params", "published",
              "description")  # fmt: skip
    body = [
        (
            str(row["kind"]),
            str(row["name"]),
            f"{row['parameters']:,}",
            f"{row['published_parameters']:,}" if row["published_parameters"] else "-",
            str(row["description"]),
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(4)]
    lines = []
    for line in (header, *body):
        cells = [
            line[0].ljust(widths[0]),
            line[1].ljust(widths[1]),
            line[2].rjust(widths[2]),
            line[3].rjust(widths[3]),
            line[4],
        ]
        lines.append("  ".join(cells))
    lines.insert(1, "-" * len(lines[0]))
    if note:
        lines += ["", note]
    return "\n".join(lines)
