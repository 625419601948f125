"""``leadtune models``: the registered encoders and contexts, with their parameter counts.

Imports nothing heavy at module level (torch loads inside the command), so building the CLI
parser stays fast.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(subparsers: Any) -> None:
    from leadtune.trainables.commands import DefaultsHelpFormatter

    parser = subparsers.add_parser(
        "models",
        help="list lead-identification encoders and contexts with parameter counts",
        description=(
            "List the registered per-lead encoders and lead contexts with their parameter "
            "counts at feature width D, and the reference model's total "
            "(inception_gru + 5 set attention blocks). Encoder counts are compared with the "
            "paper's Table VI at D = 128."
        ),
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument(
        "--d-model",
        type=_positive_int,
        default=128,
        help="feature width D the counts are computed at (a multiple of the 8 heads)",
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.set_defaults(func=run_models)


def run_models(args: argparse.Namespace) -> int:
    from leadtune.trainables.lead_id.models import describe_models

    rows = describe_models(d_model=args.d_model)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(format_table(rows, args.d_model))
    return 0


def format_table(rows: list[dict[str, Any]], d_model: int) -> str:
    header = ("kind", "name", f"params (D={d_model})", "published", "description")
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
    lines.append("")
    lines.append(
        "published: Table VI of the paper (encoders), the released code (reference model)."
    )
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
