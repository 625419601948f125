"""`leadtune search` and `leadtune promote`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _parse_set(values: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def run_search_command(args: argparse.Namespace) -> int:
    from search.tuner import SearchSettings, run_search
    from trainables.registry import DataRequest

    settings = SearchSettings(
        space=args.space,
        study=args.study,
        trials=args.trials,
        epochs=args.epochs,
        max_concurrent=args.max_concurrent,
        cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial,
        scheduler=args.scheduler,
        max_failures=args.max_failures,
        time_budget_s=args.time_budget,
        address=args.address,
        storage_path=args.storage_path,
        tracking_uri=args.tracking_uri,
        optuna_storage=args.optuna_storage,
        seed=args.seed,
        metric=args.metric,
        mode=args.mode,
        keep_checkpoints=args.keep_checkpoints,
        resume=args.resume,
        register_name=args.register_name,
        promote=not args.no_promote,
        overrides=_parse_set(args.set),
        data=DataRequest(source=Path(args.source), cache_dir=args.cache_dir, limit=args.limit),
    )
    outcome = run_search(settings)
    print(format_summary(outcome))
    if args.json:
        Path(args.json).write_text(json.dumps(_jsonable(outcome), indent=2, default=str))
    return 0 if outcome.best else 1


def durable_tracking_uri(outcome: Any) -> str:
    """The URI to reach this search's MLflow data after the command ends.

    A server that leadtune started itself is gone by then; its SQLite database is not.
    """
    if outcome.tracking_uri.startswith("http://127.0.0.1"):
        return f"sqlite:///{Path(outcome.experiment_path).parents[1] / 'mlflow.db'}"
    return outcome.tracking_uri


def format_summary(outcome: Any) -> str:
    metric = outcome.metric
    durable = durable_tracking_uri(outcome)
    lines = ["", f"search {outcome.study}: {len(outcome.trials)} trial(s)"]
    header = (
        f"  {'trial':<14} {'state':<24} {'epoch':>5} {metric:>12} {'lead_acc':>9} {'set_acc':>8}"
    )
    lines.append(header)
    for t in outcome.trials:
        lines.append(
            f"  {t['trial_id']:<14} {t['state']:<24} {t['epoch'] or '-':>5} "
            f"{_fmt(t.get(metric)):>12} {_fmt(t.get('val_lead_accuracy')):>9} "
            f"{_fmt(t.get('val_set_accuracy')):>8}"
        )
    if outcome.best:
        b = outcome.best
        params = {k: v for k, v in (b["config"] or {}).items() if k not in ("seed", "num_threads")}
        lines += [
            "",
            f"best trial: {b['trial_id']}  {metric} = {_fmt(b[metric])}",
            f"  config: {json.dumps(params, default=str)}",
            f"  checkpoint: {b.get('best_checkpoint')}",
        ]
    else:
        lines.append("no trial finished with a result")
    lines += [
        "",
        f"MLflow: {outcome.tracking_uri}  experiment {outcome.experiment_id} "
        f"({outcome.study}), parent run {outcome.parent_run_id}",
        f"results: {outcome.experiment_path}",
    ]
    p = outcome.promotion
    if p:
        lines += [
            f"registered: {p['model_uri']} (test lead accuracy "
            f"{_fmt(p['test_metrics'].get('test_lead_accuracy'))}, set accuracy "
            f"{_fmt(p['test_metrics'].get('test_set_accuracy'))}, {p['test_metrics'].get('test_records')} ECGs)",
            f"champion: {'moved to this version' if p['alias_moved'] else 'unchanged'} — {p['reason']}",
            f"use it: leadtune label RECORD --model {p['champion_uri']} --tracking-uri {durable}",
        ]
    if durable != outcome.tracking_uri:
        lines.append(
            f"(the local MLflow server was stopped; browse with: mlflow ui --backend-store-uri "
            f"{durable})"
        )
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("-" if value is None else str(value))


def _jsonable(outcome: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(outcome)


def run_promote_command(args: argparse.Namespace) -> int:
    from search.promote import promote_best
    from search.tracking import MlflowServer
    from search.tuner import STATE_FILE, latest_finished_or_given

    experiment_path = latest_finished_or_given(Path(args.storage_path), args.study, args.experiment)
    state = json.loads((experiment_path / STATE_FILE).read_text())
    tracking_uri = args.tracking_uri or state.get("tracking_uri_given")
    server = None
    if tracking_uri is None:
        root = Path(args.storage_path).resolve()
        server = MlflowServer(db_path=root / "mlflow.db", artifacts=root / "mlartifacts").start()
        tracking_uri = server.uri
    try:
        decision = promote_best(
            tracking_uri, experiment_path, register_name=args.register_name, force=args.force
        )
    finally:
        if server is not None:
            server.stop()
    print(json.dumps(decision, indent=2, default=str))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    search = subparsers.add_parser(
        "search",
        help="run a Ray Tune + Optuna search; every trial in MLflow; promote the best",
        description="Run a hyperparameter search (Ray Tune, Optuna TPE, ASHA), log every trial "
        "to MLflow, evaluate the best model once on the test split and register it.",
        formatter_class=fmt,
    )
    search.add_argument("--space", default="lead_id", help="search space name (see spaces/)")
    search.add_argument("--study", default=None, help="study name (default: the space's name)")
    search.add_argument("--trials", type=int, default=20, help="number of trials")
    search.add_argument(
        "--epochs", type=int, default=None, help="epochs per trial (default: the space's, else 30)"
    )
    search.add_argument("--max-concurrent", type=int, default=1, help="trials running at once")
    search.add_argument("--cpus-per-trial", type=float, default=1.0)
    search.add_argument(
        "--gpus-per-trial", type=float, default=0.0, help="fractions share a GPU, e.g. 0.25"
    )
    search.add_argument("--scheduler", choices=("asha", "fifo"), default="asha")
    search.add_argument(
        "--max-failures",
        type=int,
        default=1,
        help="retries of a crashed trial (from its checkpoint)",
    )
    search.add_argument(
        "--time-budget", type=float, default=None, help="seconds; no new trials after it"
    )
    search.add_argument(
        "--address", default=None, help="Ray address; 'auto' joins a running cluster"
    )
    search.add_argument(
        "--storage-path", default="runs/search", help="results, checkpoints, default databases"
    )
    search.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow server or database (default: start one on SQLite)",
    )
    search.add_argument(
        "--optuna-storage",
        default=None,
        help="SQLAlchemy URL (default: sqlite under --storage-path)",
    )
    search.add_argument("--seed", type=int, default=0)
    search.add_argument(
        "--metric",
        default=None,
        help="validation metric to optimise (default: the space's, val_loss)",
    )
    search.add_argument("--mode", choices=("min", "max"), default=None)
    search.add_argument(
        "--keep-checkpoints", type=int, default=2, help="best k checkpoints kept per trial"
    )
    search.add_argument(
        "--resume", action="store_true", help="finish the study's interrupted search"
    )
    search.add_argument("--register-name", default="lead-id", help="registered model name")
    search.add_argument(
        "--no-promote", action="store_true", help="skip test evaluation and registration"
    )
    search.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="fix a trial setting, e.g. --set max_train_records=200",
    )
    search.add_argument("--json", default=None, help="also write the outcome as JSON to this file")
    from trainables.commands import add_data_arguments

    add_data_arguments(search)
    search.set_defaults(func=run_search_command)

    promote = subparsers.add_parser(
        "promote",
        help="evaluate, register and maybe crown the best model of a finished search",
        formatter_class=fmt,
    )
    promote.add_argument("--study", default="lead_id")
    promote.add_argument("--storage-path", default="runs/search")
    promote.add_argument(
        "--experiment", default=None, help="search folder (default: the study's latest)"
    )
    promote.add_argument("--tracking-uri", default=None)
    promote.add_argument("--register-name", default=None)
    promote.add_argument("--force", action="store_true", help="move the champion alias regardless")
    promote.set_defaults(func=run_promote_command)
