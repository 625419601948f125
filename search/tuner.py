"""Running a search: a Ray Tune ``Tuner`` driven by a persistent Optuna (TPE) study, with ASHA,
checkpoints, failure retries, MLflow parent/child runs, resume, and promotion at the end.

Nothing here knows about ECGs: the task comes from :func:`trainables.registry.get_trainable`
and the space from :func:`spaces.get_space`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainables.registry import DataRequest

STATE_FILE = "leadtune_search.json"
FAULT_ENV = "LEADTUNE_INJECT_FAULT"  # "EPOCH:MARKER_FILE": crash once after EPOCH (tests)


@dataclass
class SearchSettings:
    space: str = "lead_id"
    study: str | None = None  # default: the space's name
    trials: int = 20
    epochs: int | None = None  # default: the space's fixed value, else the trainable's
    max_concurrent: int = 1
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    scheduler: str = "asha"  # asha | fifo
    max_failures: int = 1
    time_budget_s: float | None = None
    address: str | None = None  # None: local Ray; "auto": join the running cluster
    storage_path: str = "runs/search"
    tracking_uri: str | None = None  # None: start a local mlflow server on SQLite
    optuna_storage: str | None = None  # None: sqlite under storage_path
    seed: int = 0
    metric: str | None = None  # default: the space's
    mode: str | None = None
    keep_checkpoints: int = 2
    resume: bool = False
    register_name: str = "lead-id"
    promote: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)  # fixed trial settings
    data: DataRequest = field(default_factory=lambda: DataRequest(source=Path(".")))

    def validate(self) -> None:
        if self.trials < 1:
            raise ValueError(f"--trials must be at least 1, got {self.trials}")
        if self.max_concurrent < 1:
            raise ValueError(f"--max-concurrent must be at least 1, got {self.max_concurrent}")
        if self.cpus_per_trial <= 0:
            raise ValueError("--cpus-per-trial must be positive")
        if self.gpus_per_trial < 0 or (self.gpus_per_trial > 1 and self.gpus_per_trial % 1):
            raise ValueError("--gpus-per-trial must be a fraction in (0, 1] or a whole number")
        if self.scheduler not in ("asha", "fifo"):
            raise ValueError(f"--scheduler must be asha or fifo, got {self.scheduler!r}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError("--epochs must be at least 1")
        if "://" in self.storage_path:
            raise ValueError(
                f"--storage-path {self.storage_path} is a URI; use a folder on a shared "
                "filesystem (NFS/EFS) mounted on every node"
            )
        if self.mode not in (None, "min", "max"):
            raise ValueError(f"--mode must be min or max, got {self.mode!r}")


@dataclass
class SearchOutcome:
    study: str
    experiment_path: Path
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    metric: str
    mode: str
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    promotion: dict[str, Any] | None = None


def _trial_entry(config: dict[str, Any], data: Any = None, trainable_name: str = "lead_id"):
    """What every Tune trial runs: the task's training function, reporting through Tune."""
    import ray

    from trainables.lead_id import TuneReporter
    from trainables.registry import get_trainable

    reporter = SearchReporter(TuneReporter(), node_id=ray.get_runtime_context().get_node_id())
    # Nothing is returned: Tune would take a returned dict as one more result (logged twice).
    get_trainable(trainable_name).train(config, data, reporter=reporter)


class _TrialName:
    """Short trial names and folders (``lead_id_1a2b3c4d``) instead of Ray's config dumps."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def __call__(self, trial: Any) -> str:
        return f"{self.prefix}_{trial.trial_id}"


class SearchReporter:
    """Adds the Ray node id to each report (trial placement), and the test fault hook."""

    def __init__(self, inner: Any, node_id: str):
        self.inner = inner
        self.node_id = node_id
        fault = os.environ.get(FAULT_ENV, "")
        self.fault_epoch, _, marker = fault.partition(":")
        self.fault_marker = Path(marker) if marker else None

    def latest_checkpoint(self):
        return self.inner.latest_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        self.inner.report({**metrics, "trial_node_id": self.node_id}, checkpoint_dir)
        if (
            self.fault_marker is not None
            and str(metrics.get("epoch")) == self.fault_epoch
            and not self.fault_marker.exists()
        ):
            self.fault_marker.write_text("fault injected\n")
            raise RuntimeError(f"injected fault after epoch {self.fault_epoch} ({FAULT_ENV})")


def _log(message: str) -> None:
    print(f"[leadtune] {message}", file=sys.stderr, flush=True)


def latest_unfinished(study_dir: Path) -> Path | None:
    candidates = sorted(p.parent for p in study_dir.glob(f"*/{STATE_FILE}"))
    for path in reversed(candidates):
        state = json.loads((path / STATE_FILE).read_text())
        if state.get("status") != "finished":
            return path
    return None


def _write_state(path: Path, **values: Any) -> dict[str, Any]:
    file = path / STATE_FILE
    state = json.loads(file.read_text()) if file.exists() else {}
    state.update(values)
    path.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, default=str))
    os.replace(tmp, file)
    return state


def prepare_study(optuna_storage: str, study: str, mode: str, initial_points, seed: int):
    """Create (or load) the Optuna study; queue the space's initial points only when it is new."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    created = optuna.create_study(
        study_name=study,
        storage=optuna_storage,
        direction="minimize" if mode == "min" else "maximize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        load_if_exists=True,
    )
    if not created.trials:
        for point in initial_points:
            created.enqueue_trial(dict(point))
    return created


def run_search(settings: SearchSettings) -> SearchOutcome:
    """Run (or resume) a search and promote its best model; returns where everything is."""
    settings.validate()
    from spaces import get_space
    from trainables.registry import get_trainable

    space = get_space(settings.space)
    spec = get_trainable(space.trainable)
    study = settings.study or space.name
    metric = settings.metric or space.metric
    mode = settings.mode or space.mode
    root = Path(settings.storage_path).resolve()
    study_dir = root / study
    optuna_storage = settings.optuna_storage or f"sqlite:///{root / 'optuna.db'}"

    if settings.resume:
        experiment_path = latest_unfinished(study_dir)
        if experiment_path is None:
            raise ValueError(
                f"no unfinished search of study {study!r} under {study_dir}; "
                "run without --resume to start one"
            )
        previous = json.loads((experiment_path / STATE_FILE).read_text())
    else:
        experiment_path = study_dir / time.strftime("search-%Y%m%d-%H%M%S")
        previous = {}
    root.mkdir(parents=True, exist_ok=True)

    fixed = {**space.fixed, **settings.overrides}
    if settings.epochs is not None:
        fixed["epochs"] = settings.epochs
    fixed.setdefault("seed", settings.seed)
    fixed.setdefault("num_threads", max(1, int(settings.cpus_per_trial)))
    if previous:
        fixed = previous["fixed"]  # a resumed search keeps its settings

    server = None
    tracking_uri = settings.tracking_uri or previous.get("tracking_uri_given")
    if tracking_uri is None:
        from search.tracking import MlflowServer

        _log("starting a local MLflow tracking server (SQLite) ...")
        server = MlflowServer(db_path=root / "mlflow.db", artifacts=root / "mlartifacts").start()
        tracking_uri = server.uri
    try:
        return _run(
            settings, space, spec, study, metric, mode, root, experiment_path, previous,
            fixed, tracking_uri, optuna_storage,
        )  # fmt: skip
    finally:
        if server is not None:
            server.stop()


def _run(
    settings, space, spec, study, metric, mode, root, experiment_path, previous, fixed,
    tracking_uri, optuna_storage,
) -> SearchOutcome:  # fmt: skip
    import mlflow
    import ray
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from search.tracking import (
        TRACKING_URI_ENV,
        MlflowTrialCallback,
        ensure_experiment,
        flat_params,
        git_commit,
    )

    os.environ[TRACKING_URI_ENV] = tracking_uri
    # The classic reporter gives one compact, sorted trial table instead of a box per result.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(client, study, tracking_uri)

    _log(f"loading data from {settings.data.source} ...")
    data, dataset = spec.load_data(settings.data)
    fingerprint = getattr(dataset, "fingerprint", "unknown")

    if previous.get("parent_run_id"):
        parent_run_id = previous["parent_run_id"]
        client.update_run(parent_run_id, status="RUNNING")
    else:
        parent = client.create_run(
            experiment_id,
            run_name=experiment_path.name,
            tags={
                "leadtune.kind": "search",
                "leadtune.space": space.name,
                "leadtune.study": study,
                "leadtune.data_fingerprint": fingerprint,
                "leadtune.git_commit": git_commit(),
                "leadtune.experiment_path": str(experiment_path),
                "leadtune.optuna_storage": optuna_storage,
                "mlflow.note.content": space.description,
            },
        )
        parent_run_id = parent.info.run_id
        search_params = {
            k: v for k, v in asdict(settings).items() if k not in ("overrides", "data", "resume")
        }
        search_params.update({f"fixed.{k}": v for k, v in fixed.items()})
        search_params.update(
            {"data.source": settings.data.source, "data.limit": settings.data.limit}
        )
        for key, value in flat_params(search_params).items():
            client.log_param(parent_run_id, key, value)
        client.log_text(parent_run_id, _space_source(space), "space.py")
    _write_state(
        experiment_path,
        status="running",
        study=study,
        space=space.name,
        metric=metric,
        mode=mode,
        fixed=fixed,
        parent_run_id=parent_run_id,
        experiment_id=experiment_id,
        tracking_uri_given=settings.tracking_uri,
        optuna_storage=optuna_storage,
        data_source=str(settings.data.source),
        data_limit=settings.data.limit,
        data_fingerprint=fingerprint,
        register_name=settings.register_name,
    )

    if not ray.is_initialized():
        from trainables.runtime import ray_runtime_env

        ray.init(
            address=settings.address,
            include_dashboard=False,
            configure_logging=True,
            logging_level="WARNING",
            log_to_driver=False,
            runtime_env=ray_runtime_env(settings.gpus_per_trial),  # allocator env, GPU share
        )
    trainable = tune.with_resources(
        tune.with_parameters(_trial_entry, data=data, trainable_name=space.trainable),
        {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial},
    )
    callback = MlflowTrialCallback(tracking_uri, experiment_id, parent_run_id, metric)
    reporter = tune.CLIReporter(
        metric_columns={
            "epoch": "epoch",
            metric: metric,
            "val_lead_accuracy": "lead_acc",
            "val_set_accuracy": "set_acc",
        },
        # only parameters every trial has: the reporter fails on conditional ones (depth, heads)
        parameter_columns=["encoder", "context", "d_model", "lr", "batch_size"],
        max_report_frequency=20,
        sort_by_metric=True,
    )

    if settings.resume:
        _log(f"resuming {experiment_path}")
        tuner = tune.Tuner.restore(
            str(experiment_path), trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        prepare_study(optuna_storage, study, mode, space.initial_points, settings.seed)
        import optuna

        searcher = OptunaSearch(
            space=space.define,
            metric=metric,
            mode=mode,
            sampler=optuna.samplers.TPESampler(seed=settings.seed),
            study_name=study,
            storage=optuna.storages.RDBStorage(optuna_storage),
        )
        scheduler = (
            ASHAScheduler(max_t=int(fixed.get("epochs", 30)), grace_period=1, reduction_factor=2)
            if settings.scheduler == "asha"
            else FIFOScheduler()
        )
        tuner = tune.Tuner(
            trainable,
            param_space=dict(fixed),
            tune_config=tune.TuneConfig(
                search_alg=ConcurrencyLimiter(searcher, max_concurrent=settings.max_concurrent),
                scheduler=scheduler,
                metric=metric,
                mode=mode,
                num_samples=settings.trials,
                time_budget_s=settings.time_budget_s,
                trial_name_creator=_TrialName(space.trainable),
                trial_dirname_creator=_TrialName(space.trainable),
            ),
            run_config=tune.RunConfig(
                name=experiment_path.name,
                storage_path=str(experiment_path.parent),
                failure_config=tune.FailureConfig(max_failures=settings.max_failures),
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=settings.keep_checkpoints,
                    checkpoint_score_attribute=metric,
                    checkpoint_score_order=mode,
                ),
                callbacks=[callback],
                progress_reporter=reporter,
                verbose=1,
            ),
        )
    _log(
        f"search {study}: {settings.trials} trial(s), up to {settings.max_concurrent} at once; "
        f"MLflow {tracking_uri} (experiment {experiment_id}, parent run {parent_run_id})"
    )
    started = time.perf_counter()
    try:
        grid = tuner.fit()
    except BaseException:
        # The search itself broke (not a trial): leave it resumable and say so in MLflow.
        client.set_terminated(parent_run_id, "FAILED")
        _write_state(experiment_path, status="interrupted")
        raise
    wall = time.perf_counter() - started

    trials = summarise_trials(grid, metric, mode)
    finished = [t for t in trials if t["state"] != "failed" and t.get(metric) is not None]
    interrupted = any(t["state"] in ("pending", "running", "paused") for t in trials)
    best = None
    if finished:
        best = (
            min(finished, key=lambda t: t[metric])
            if mode == "min"
            else max(finished, key=lambda t: t[metric])
        )
        client.log_batch(
            parent_run_id,
            metrics=_best_metrics(best),
            tags=_tags({"leadtune.best_trial": best["trial_id"]}),
        )
    client.log_metric(parent_run_id, "search_wall_seconds", wall)
    client.log_metric(
        parent_run_id, "trial_seconds_total", sum(t.get("seconds") or 0 for t in trials)
    )
    failed = [t for t in trials if t["state"] == "failed"]
    status = "interrupted" if interrupted or grid.num_terminated < len(trials) else "finished"
    if failed:
        status = "finished_with_errors" if status == "finished" else status
    client.set_terminated(parent_run_id, "FINISHED" if status == "finished" else "KILLED")
    _write_state(
        experiment_path,
        status="finished" if status == "finished" else status,
        wall_seconds=wall,
        best_trial=best["trial_id"] if best else None,
    )
    outcome = SearchOutcome(
        study=study,
        experiment_path=experiment_path,
        tracking_uri=tracking_uri,
        experiment_id=experiment_id,
        parent_run_id=parent_run_id,
        metric=metric,
        mode=mode,
        trials=trials,
        best=best,
    )
    if best and settings.promote and status in ("finished", "finished_with_errors"):
        from search.promote import promote_best

        outcome.promotion = promote_best(
            tracking_uri=tracking_uri,
            experiment_path=experiment_path,
            dataset=dataset,
            register_name=settings.register_name,
        )
    return outcome


def summarise_trials(grid: Any, metric: str, mode: str) -> list[dict[str, Any]]:
    """One row per trial: id, state, config, last metrics, best checkpoint, duration."""
    rows = []
    for result in grid:
        metrics = dict(result.metrics or {})
        trial_id = metrics.get("trial_id") or Path(result.path).name
        planned = int((result.config or {}).get("epochs", 0) or 0)
        if result.error is not None:
            state = "failed"
        elif not metrics:
            state = "pending"
        elif metrics.get("early_stopped"):
            state = "early_stopped_patience"
        elif planned and int(metrics.get("epoch", planned)) < planned:
            state = "early_stopped_scheduler" if metrics.get("done", True) else "paused"
        else:
            state = "completed"
        best_checkpoint = None
        if result.best_checkpoints:
            pairs = [
                (c, m.get(metric)) for c, m in result.best_checkpoints if m.get(metric) is not None
            ]
            if pairs:
                pick = min if mode == "min" else max
                best_checkpoint = pick(pairs, key=lambda p: p[1])[0].path
        row = {
            "trial_id": trial_id,
            "state": state,
            "config": result.config,
            "epoch": metrics.get("epoch"),
            metric: _best_value(result, metric, mode),
            "val_lead_accuracy": metrics.get("val_lead_accuracy"),
            "val_set_accuracy": metrics.get("val_set_accuracy"),
            "seconds": metrics.get("time_total_s"),
            "node_id": metrics.get("trial_node_id"),
            "best_checkpoint": best_checkpoint,
            "path": result.path,
            "error": str(result.error).splitlines()[0] if result.error else None,
        }
        rows.append(row)
    return rows


def _best_value(result: Any, metric: str, mode: str) -> float | None:
    frame = result.metrics_dataframe
    if frame is None or metric not in getattr(frame, "columns", ()):
        return (result.metrics or {}).get(metric)
    series = frame[metric].dropna()
    if series.empty:
        return None
    return float(series.min() if mode == "min" else series.max())


def _best_metrics(best: dict[str, Any]) -> list:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [
        Metric(f"best_{key}", float(value), now, 0)
        for key, value in best.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch"
    ]


def _tags(values: dict[str, str]) -> list:
    from mlflow.entities import RunTag

    return [RunTag(k, str(v)) for k, v in values.items()]


def _space_source(space: Any) -> str:
    import inspect

    try:
        return inspect.getsource(inspect.getmodule(space.define))
    except (OSError, TypeError):
        return repr(space)


def latest_finished_or_given(storage_path: Path, study: str, given: str | None) -> Path:
    """The search folder named by --experiment, else the study's newest search."""
    if given:
        path = Path(given)
        if not (path / STATE_FILE).exists():
            raise FileNotFoundError(f"{path} is not a leadtune search folder (no {STATE_FILE})")
        return path
    found = sorted(p.parent for p in (Path(storage_path) / study).glob(f"*/{STATE_FILE}"))
    if not found:
        raise FileNotFoundError(
            f"no search of study {study!r} under {storage_path}; pass --storage-path and --study"
        )
    return found[-1]
