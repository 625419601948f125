"""`leadtune search` and `leadtune promote`.

Conventions shared by every leadtune command: ``--study NAME`` names a study, ``--json`` prints
the result as JSON on standard output (the human-readable text then goes to standard error).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any


def run_search_command(args: argparse.Namespace) -> int:
    from leadtune.search.settings import settings_from_args
    from leadtune.search.tuner import run_search

    if args.list_spaces:
        from leadtune.spaces import SPACES

        for name, space in sorted(SPACES.items()):
            print(f"{name:<14} task {space.task:<10} {space.description}")
        return 0
    outcome = run_search(settings_from_args(args))
    text = format_summary(outcome)
    print(text, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(asdict(outcome), indent=2, default=str))
    if outcome.status != "finished":
        return 3  # interrupted: resumable, nothing promoted
    return 0 if outcome.best else 1


def format_summary(outcome: Any) -> str:
    from leadtune.search.tracking import ui_url
    from leadtune.trainables.tasks import get_task

    spec = get_task(outcome.task)
    columns = [(c.key, c.label) for c in spec.table_metrics]
    further = [name for name, _ in outcome.objectives]
    lines = [
        "",
        f"search {outcome.study} ({outcome.task}): {len(outcome.trials)} trial(s), "
        f"status {outcome.status}",
        f"  {'trial':<12} {'optuna':>6} {'state':<24} {'epochs':>6} {'best ep':>7} "
        f"{outcome.metric:>14}"
        + "".join(f" {label:>9}" for _, label in columns)
        + "".join(f" {name:>16}" for name in further)
        + ("  pareto" if further else ""),
    ]
    for t in outcome.trials:
        lines.append(
            f"  {t['trial_id']:<12} {_fmt(t.get('optuna_trial')):>6} {t['state']:<24} "
            f"{_fmt(t.get('epochs_run')):>6} {_fmt(t.get('best_epoch')):>7} "
            f"{_fmt(t.get('value')):>14}"
            + "".join(f" {_fmt(t.get(key)):>9}" for key, _ in columns)
            + "".join(f" {_fmt((t.get('objectives') or {}).get(n)):>16}" for n in further)
            + (f"  {'yes' if t.get('pareto') else '':>6}" if further else "")
        )
    if outcome.budgets:
        from leadtune.search.objectives import within_text

        lines.append(f"champion rule: best {outcome.metric} within {within_text(outcome.budgets)}")
    if outcome.best:
        b = outcome.best
        hidden = ("seed", "num_threads")
        params = {k: v for k, v in (b["config"] or {}).items() if k not in hidden}
        lines += [
            "",
            f"best trial: {b['trial_id']} (Optuna trial {b.get('optuna_trial')}), "
            f"{outcome.metric} = {_fmt(b['value'])} at epoch {b.get('best_epoch')}",
            f"  config: {json.dumps(params, default=str)}",
            f"  checkpoint: {b.get('best_checkpoint')}",
        ]
    else:
        lines.append("no trial finished with a result")
    durable = outcome.durable_tracking_uri or outcome.tracking_uri
    lines += [
        "",
        f"MLflow: experiment {outcome.study} ({outcome.experiment_id}), parent run "
        f"{outcome.parent_run_id}",
        f"  browse: mlflow ui --backend-store-uri {durable}, then "
        f"{ui_url('http://127.0.0.1:5000', outcome.experiment_id)}"
        if durable.startswith("sqlite:")
        else f"  browse: {ui_url(durable, outcome.experiment_id)}",
        f"results: {outcome.experiment_path}",
    ]
    if outcome.cpu is not None:
        lines.append(outcome.cpu.sentence())
    p = outcome.promotion
    if p:
        figures = ", ".join(
            f"{c.label} {_fmt(p['test_metrics'].get(c.key))}" for c in spec.test_metrics
        )
        lines += [
            f"registered: {p['model_uri']} ({figures})",
            f"champion: {'moved to this version' if p['alias_moved'] else 'unchanged'} "
            f"({p['reason']})",
            f"use it: leadtune evaluate {p['champion_uri']} --tracking-uri {durable}",
        ]
        if p.get("search_gain"):
            from leadtune.search.promote import gain_sentence

            lines.append(gain_sentence(p["search_gain"]))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1000:
        return str(int(value))  # a count (params)
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def run_promote_command(args: argparse.Namespace) -> int:
    from leadtune.search.objectives import parse_within
    from leadtune.search.promote import check_finished, promote_best
    from leadtune.search.state import find_search
    from leadtune.search.tracking import check_tracking_uri, sqlite_uri
    from leadtune.trainables.runtime import check_writable

    budgets = [parse_within(text) for text in args.within] if args.within else None
    if args.register_name:
        from leadtune.search.tuner import check_register_name

        check_register_name(args.register_name)
    root = Path(args.storage_path).resolve()
    search_dir = find_search(root, args.study, args.experiment)
    saved = check_finished(search_dir)  # before anything is written
    tracking_uri = args.tracking_uri or saved.get("tracking_uri_given")
    if tracking_uri is None:
        if not (root / "mlflow.db").is_file():
            raise FileNotFoundError(
                f"no MLflow database at {root / 'mlflow.db'}; pass --tracking-uri"
            )
        check_writable(root, "--storage-path")
        tracking_uri = sqlite_uri(root / "mlflow.db")
    else:
        check_tracking_uri(tracking_uri, "--tracking-uri")
    try:
        decision = promote_best(
            tracking_uri, search_dir, register_name=args.register_name, force=args.force,
            budgets=budgets,
        )  # fmt: skip
    except KeyboardInterrupt:
        from leadtune.search.faults import Interrupted

        raise Interrupted(
            "promotion interrupted; run the same `leadtune promote` again to finish it (a "
            "version registered already is completed, not registered twice)"
        ) from None
    if args.json:
        print(json.dumps(decision, indent=2, default=str))
    else:
        print(
            f"{decision['model_uri']}: champion "
            f"{'moved to it' if decision['alias_moved'] else 'unchanged'} ({decision['reason']})\n"
            f"test: {json.dumps(decision['test_metrics'])}\n"
            f"use it: leadtune evaluate {decision['champion_uri']} --tracking-uri {tracking_uri}"
        )
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from leadtune.search.settings import add_search_arguments
    from leadtune.trainables.commands import add_data_arguments

    search = subparsers.add_parser(
        "search",
        help="run a Ray Tune + Optuna search; every trial in MLflow; promote the best",
        description="Run a hyperparameter search (Ray Tune, Optuna TPE, ASHA), log every trial "
        "to MLflow, evaluate the best model once on the test split and register it. Exit "
        "status: 0 finished, 1 no trial gave a result, 2 bad input, 3 interrupted (resume "
        "with --resume).",
    )
    add_search_arguments(search)
    search.add_argument(
        "--list-spaces", action="store_true", help="list the registered search spaces and exit"
    )
    search.add_argument(
        "--json", action="store_true", help="print the outcome as JSON on standard output"
    )
    add_data_arguments(search)
    search.set_defaults(func=run_search_command)

    promote = subparsers.add_parser(
        "promote",
        help="evaluate, register and maybe crown the best model of a finished search",
        description="Promote the best trial of a finished search: evaluate its best checkpoint "
        "once on the test split, register it in the MLflow Model Registry, and move the "
        "'champion' alias to it if it beats the current champion on the same validation "
        "metric and data. Exit status: 0 promoted, 2 bad input, 3 interrupted (run it again "
        "to finish).",
    )
    promote.add_argument(
        "--study", default=None, help="study name (default: the only one under --storage-path)"
    )
    promote.add_argument(
        "--storage-path", default="runs/search", help="the search's --storage-path (default: "
        "runs/search)",
    )  # fmt: skip
    promote.add_argument(
        "--experiment", default=None, help="search folder (default: the study's newest)"
    )
    promote.add_argument(
        "--tracking-uri", default=None, help="MLflow URI (default: the one the search used)"
    )
    promote.add_argument(
        "--register-name", default=None, help="registered model name (default: the task's)"
    )
    promote.add_argument("--force", action="store_true", help="move the champion alias regardless")
    promote.add_argument(
        "--within", action="append", default=None, metavar="BUDGET",
        help="a budget the champion must meet, METRIC<=VALUE or METRIC>=VALUE (repeat for "
        "more); replaces the search's own (default: the search's --within)",
    )  # fmt: skip
    promote.add_argument("--json", action="store_true", help="print the decision as JSON")
    promote.set_defaults(func=run_promote_command)
