"""Several objectives and the one rule that picks a champion among them.

A search optimises its primary metric (``--metric``, the space's ``metric``); a space (or
``--objective METRIC:MODE``, repeatable) may add further objectives, e.g. ``params:min`` (the
model's parameter count) or ``infer_ms_per_ecg:min`` (validation inference time per ECG on the
trial's own device, measured every epoch inside the trial). With more than one objective the
Optuna study has one direction per objective, its TPE sampler works on all of them (Optuna's
multi-objective TPE), and the search keeps the Pareto front of the completed trials.

Every objective of a trial is read at the **best epoch of the primary metric**: the epoch whose
checkpoint would be promoted.

The champion is always chosen by one rule, everywhere (the search's summary, ``leadtune
promote``, the report): **the best primary metric among the trials that meet every
``--within`` budget** (e.g. ``--within params<=500000 --within infer_ms_per_ecg<=5``). Without
budgets that is the single-objective rule of old.
"""

from __future__ import annotations

import math
import operator
import re
from typing import Any

# What every task reports each epoch about the model's cost (trainables.training.report_epoch
# and each task's validation): objectives and budgets may name them.
COST_METRICS = ("params", "infer_ms_per_ecg")
_OPS = {"<=": operator.le, ">=": operator.ge}


def parse_objective(text: str) -> tuple[str, str]:
    """``METRIC:MODE`` (mode min or max) -> (metric, mode)."""
    metric, sep, mode = text.rpartition(":")
    if not sep or not metric or mode not in ("min", "max"):
        raise ValueError(f"--objective expects METRIC:min or METRIC:max, got {text!r}")
    return metric, mode


def parse_within(text: str) -> tuple[str, str, float]:
    """``METRIC<=VALUE`` or ``METRIC>=VALUE`` -> (metric, operator, value)."""
    match = re.fullmatch(r"\s*([A-Za-z0-9_.]+)\s*(<=|>=)\s*([-+0-9.eE]+)\s*", text)
    if not match:
        raise ValueError(
            f"--within expects METRIC<=VALUE or METRIC>=VALUE (e.g. params<=500000), got {text!r}"
        )
    try:
        value = float(match.group(3))
    except ValueError:
        raise ValueError(f"--within {text!r}: {match.group(3)!r} is not a number") from None
    return match.group(1), match.group(2), value


def within_text(budgets: list[tuple[str, str, float]] | list[list[Any]]) -> str:
    return ", ".join(f"{m} {op} {v:g}" for m, op, v in budgets) or "none"


def meets(row: dict[str, Any], budgets: list) -> bool:
    """Whether a trial row's best-epoch figures meet every budget (a missing figure does not)."""
    figures = row.get("objectives") or {}
    for metric, op, limit in budgets:
        value = figures.get(metric, row.get(metric))
        if not _finite(value) or not _OPS[op](float(value), float(limit)):
            return False
    return True


def choose_best(rows: list[dict[str, Any]], mode: str, budgets: list) -> dict[str, Any] | None:
    """The champion rule: the best primary ``value`` among the rows within every budget."""
    eligible = [r for r in rows if _finite(r.get("value")) and meets(r, budgets)]
    if not eligible:
        return None
    return (min if mode == "min" else max)(eligible, key=lambda r: r["value"])


def pareto_front(rows: list[dict[str, Any]], objectives: list) -> list[dict[str, Any]]:
    """The rows no other row dominates on ``objectives`` [(metric, mode), ...] (the primary is
    read from ``value``, the others from ``objectives``); rows missing a figure are left out."""

    def point(row: dict[str, Any]) -> list[float] | None:
        values = []
        for index, (metric, mode) in enumerate(objectives):
            raw = row.get("value") if index == 0 else (row.get("objectives") or {}).get(metric)
            if not _finite(raw):
                return None
            values.append(float(raw) if mode == "min" else -float(raw))  # all minimised
        return values

    points = [(row, p) for row in rows if (p := point(row)) is not None]

    def dominated(p: list[float]) -> bool:
        return any(
            all(a <= b for a, b in zip(q, p, strict=True))
            and any(a < b for a, b in zip(q, p, strict=True))
            for _, q in points
        )

    return [row for row, p in points if not dominated(p)]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
