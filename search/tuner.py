"""Running a search: a Ray Tune ``Tuner`` driven by a persistent Optuna (TPE) study, with ASHA,
checkpoints, failure retries, MLflow parent/child runs, resume, and promotion at the end.

Nothing here knows a task: the task's :class:`~leadtune.trainables.tasks.TaskSpec` supplies the
training function, the data and the metrics to show; the space comes from ``leadtune.spaces``.

One rule ranks trials everywhere: a trial's value is the best value of the searched metric over
its epochs (``best_<metric>``, the epoch whose checkpoint is promoted). Tune's scheduler, the
Optuna study, the trial table, MLflow and the registry all use that number.

:func:`run_search` reads top to bottom: plan (settings, space, task, study; every check that
needs no Ray), the search folder and its run lock, the tracking server, the data, the parent run,
Ray and its resources, the Tuner, the fit, and the conclusion (trial table, status, Optuna and
MLflow bookkeeping, promotion).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import re
import secrets
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from leadtune.search import state as search_state
from leadtune.search.objectives import choose_best, pareto_front, within_text
from leadtune.search.results import finite, summarise_trials, trial_runs
from leadtune.search.searcher import PROGRESS_KEY
from leadtune.search.settings import SearchSettings, check_storage_and_urls
from leadtune.search.study import check_space, training_config
from leadtune.search.tracking import (
    TRACKING_URI_ENV,
    dataset_input,
    mlflow_client,
    sqlite_uri,
    use_tracking_uri,
)

FAULT_ENV = "LEADTUNE_INJECT_FAULT"  # "EPOCH:MARKER_FILE": crash once after EPOCH (tests)
BEST_FILE = "leadtune_best.json"  # a trial's running best, kept with each checkpoint


def _log(message: str) -> None:
    print(f"[leadtune] {message}", file=sys.stderr, flush=True)


@dataclass
class SearchOutcome:
    study: str
    task: str
    experiment_path: Path
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    metric: str
    mode: str
    status: str
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    promotion: dict[str, Any] | None = None
    durable_tracking_uri: str = ""
    cpu: Any = None  # search.cpu.CpuShare: CPU seconds inside and outside the trials
    objectives: list = field(default_factory=list)  # further objectives [(metric, mode)]
    budgets: list = field(default_factory=list)  # the champion's --within budgets


# -- what each trial runs ------------------------------------------------------------------------


def _trial_entry(config: dict[str, Any], data: Any = None, task: str = "", metric: str = "",
                 mode: str = "min", objectives: tuple = ()) -> None:  # fmt: skip
    """What every Tune trial runs: the task's training function, reporting through Tune."""
    import ray

    from leadtune.trainables.tasks import get_task
    from leadtune.trainables.training import TuneReporter

    epochs = int(config.get("epochs") or getattr(get_task(task).config_class(), "epochs", 0))
    reporter = SearchReporter(
        TuneReporter(),
        ray.get_runtime_context().get_node_id(),
        metric,
        mode,
        epochs,
        objectives=[name for name, _ in objectives],
    )
    # Nothing is returned: Tune would take a returned dict as one more result (logged twice).
    get_task(task).train(training_config(config), data, reporter=reporter)


class SearchReporter:
    """Adds to each report the trial's running best of the searched metric (``best_<metric>``,
    kept with the checkpoint so that a restored trial continues it), how far through its own
    schedule the trial is (``schedule_pct``, the scheduler's fidelity unit by default), the Ray
    node id, and the tests' fault hook."""

    def __init__(self, inner: Any, node_id: str, metric: str, mode: str, epochs: int = 0,
                 objectives: list[str] | None = None):  # fmt: skip
        self.inner, self.node_id = inner, node_id
        self.metric, self.mode, self.epochs = metric, mode, epochs
        self.best: float | None = None
        # further objectives, read at the epoch of the best metric (``at_best_<name>``)
        self.objectives = list(objectives or [])
        self.at_best: dict[str, Any] = {}
        fault = os.environ.get(FAULT_ENV, "")
        self.fault_epoch, _, marker = fault.partition(":")
        self.fault_marker = Path(marker) if marker else None

    def latest_checkpoint(self):
        path = self.inner.latest_checkpoint()
        if path is not None and (Path(path) / BEST_FILE).is_file():
            kept = json.loads((Path(path) / BEST_FILE).read_text())
            self.best, self.at_best = kept["best"], kept.get("at_best", {})
        return path

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        value = metrics.get(self.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            if self.best is None or (
                value < self.best if self.mode == "min" else value > self.best
            ):
                self.best = float(value)
                self.at_best = {name: metrics.get(name) for name in self.objectives}
        (Path(checkpoint_dir) / BEST_FILE).write_text(
            json.dumps({"best": self.best, "at_best": self.at_best})
        )
        extra = {f"best_{self.metric}": self.best, "trial_node_id": self.node_id}
        extra.update({f"at_best_{name}": v for name, v in self.at_best.items()})
        if self.epochs and metrics.get("epoch") is not None:
            extra[PROGRESS_KEY] = 100.0 * float(metrics["epoch"]) / self.epochs
        self.inner.report({**metrics, **extra}, checkpoint_dir)
        if (
            self.fault_marker is not None
            and str(metrics.get("epoch")) == self.fault_epoch
            and not self.fault_marker.exists()
        ):
            self.fault_marker.write_text("fault injected\n")
            raise RuntimeError(f"injected fault after epoch {self.fault_epoch} ({FAULT_ENV})")


class _TrialName:
    """Short trial names and folders (``<task>_1a2b3c4d``) instead of Ray's config dumps."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def __call__(self, trial: Any) -> str:
        return f"{self.prefix}_{trial.trial_id}"


# -- planning: every check that needs no Ray -------------------------------------------------------


@dataclass
class SearchPlan:
    settings: SearchSettings
    space: Any
    spec: Any
    study: str
    metric: str
    mode: str
    root: Path
    optuna_storage: str
    fixed: dict[str, Any]  # the space's fixed settings, --set and --epochs: they win
    register_name: str
    # the search's own defaults (seed, threads), which a space may vary
    defaults: dict[str, Any] = field(default_factory=dict)
    previous: dict[str, Any] = field(default_factory=dict)
    search_dir: Path | None = None
    # further objectives [(metric, mode)] and the champion's budgets [(metric, op, value)]
    objectives: list = field(default_factory=list)
    budgets: list = field(default_factory=list)

    @property
    def objective(self) -> str:
        """What Tune and Optuna rank trials by: the best epoch's value of the metric."""
        return f"best_{self.metric}"

    @property
    def optuna_objectives(self) -> tuple[list[str], list[str]]:
        """(result keys, modes) the Optuna study optimises: the primary's best, then each
        further objective at the primary's best epoch (``at_best_<metric>``)."""
        keys = [self.objective, *(f"at_best_{m}" for m, _ in self.objectives)]
        return keys, [self.mode, *(mode for _, mode in self.objectives)]

    @property
    def resumed(self) -> bool:
        return bool(self.previous)


def plan_search(settings: SearchSettings) -> SearchPlan:
    """Resolve the space, task, study and settings, and check them all before any work."""
    settings.validate()
    from leadtune.spaces import get_space
    from leadtune.trainables.tasks import get_task

    space = get_space(settings.space)
    spec = get_task(space.task)
    study = check_study_name(settings.study or space.name)
    root = Path(settings.storage_path).resolve()
    optuna_storage = settings.optuna_storage or sqlite_uri(root / "optuna.db")
    check_storage_and_urls(settings, root, optuna_storage)
    from leadtune.search.faults import check_start_space

    check_start_space(root)
    if spec.check_data is not None:
        spec.check_data(settings.data)
    if settings.address not in (None, "auto"):
        check_ray_address(settings.address)
    plan = SearchPlan(
        settings=settings,
        space=space,
        spec=spec,
        study=study,
        metric=settings.metric or space.metric,
        mode=settings.mode or space.mode,
        root=root,
        optuna_storage=optuna_storage,
        fixed={},
        register_name=check_register_name(settings.register_name or spec.register_name),
    )
    if settings.resume:
        from leadtune.search import tune_state

        plan.search_dir = _search_to_resume(plan)
        if not search_state.is_running(plan.search_dir):  # (a live one: the run lock says so)
            tune_state.check(plan.search_dir, study)  # a torn Tune state, no whole save kept
        plan.previous = search_state.read_state(plan.search_dir)
        plan.fixed = plan.previous["fixed"]  # a resumed search keeps its settings
        plan.metric, plan.mode = plan.previous["metric"], plan.previous["mode"]
        plan.register_name = settings.register_name or plan.previous["register_name"]
        plan.objectives = [tuple(o) for o in plan.previous.get("objectives", [])]
        plan.budgets = _budgets(settings, spec, plan.metric, plan.objectives) if settings.within else [
            tuple(b) for b in plan.previous.get("budgets", [])
        ]  # fmt: skip
        return plan
    if plan.metric not in spec.searchable_metrics:
        raise ValueError(
            f"--metric {plan.metric} is not a validation metric of the {spec.name} task; one of "
            f"{', '.join(spec.searchable_metrics)}"
        )
    plan.objectives = _objectives(settings, space, spec, plan.metric)
    plan.budgets = _budgets(settings, spec, plan.metric, plan.objectives)
    fixed = {**space.fixed, **settings.overrides}
    if settings.epochs is not None and "epochs" in settings.overrides:
        if settings.overrides["epochs"] != settings.epochs:
            raise ValueError(
                f"--epochs {settings.epochs} and --set epochs={settings.overrides['epochs']} "
                "disagree; give one of them"
            )
    if settings.epochs is not None:
        fixed["epochs"] = settings.epochs
    if isinstance(fixed.get("init_from"), str):  # trials run in their own folders
        fixed["init_from"] = str(Path(fixed["init_from"]).resolve())
    plan.fixed = fixed
    scheduler_plan(plan)  # a grace period beyond the horizon is an error now, not mid-start
    plan.defaults = {"seed": settings.seed, "num_threads": max(1, int(settings.cpus_per_trial))}
    from leadtune.search.study import SpaceWithFixed

    check_space(
        SpaceWithFixed(space.define, fixed), {**plan.defaults, **fixed}, spec.config_from_dict
    )
    if settings.address is None:  # a local Ray gets this machine's cores and GPUs, no more
        check_resources(settings, local_resources(count_gpus=settings.gpus_per_trial > 0))
    if settings.warm_start:
        from leadtune.search.study import check_warm_start

        check_warm_start(optuna_storage, settings.warm_start, study)
    return plan


def _objectives(settings: SearchSettings, space: Any, spec: Any, metric: str) -> list:
    from leadtune.search.objectives import COST_METRICS, parse_objective

    chosen = [parse_objective(t) for t in settings.objective or []] or list(space.objectives)
    known = [*spec.searchable_metrics, *COST_METRICS]
    for name, _ in chosen:
        if name == metric:
            raise ValueError(f"--objective {name}: that is the primary metric (--metric) already")
        if name not in known:
            raise ValueError(
                f"--objective {name} is not a metric of the {spec.name} task; one of "
                f"{', '.join(known)}"
            )
    if len({name for name, _ in chosen}) < len(chosen):
        raise ValueError("--objective names one metric twice")
    return chosen


def _budgets(settings: SearchSettings, spec: Any, metric: str, objectives: list) -> list:
    from leadtune.search.objectives import COST_METRICS, parse_within

    budgets = [parse_within(t) for t in settings.within or []]
    # what each trial row carries at its best epoch: the further objectives and the model's cost
    known = list(dict.fromkeys([*(m for m, _ in objectives), *COST_METRICS]))
    for name, _, _ in budgets:
        if name not in known:
            raise ValueError(
                f"--within {name}: a budget may name {', '.join(known)} (a further --objective "
                "or the model's cost)"
            )
    return budgets


@contextlib.contextmanager
def _sigterm_as_sigint() -> Iterator[None]:
    """SIGTERM (a scheduler's or ``timeout``'s stop) ends the search like Ctrl-C: Tune stops
    the trials, the search is left interrupted and resumable, and the MLflow server stops."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def _checked_name(flag: str, value: str) -> str:
    """Letters, digits, ``_.-``, not starting with ``.`` or ``-``, at most 100: a folder, an
    MLflow experiment or registered-model name, and a URI path segment."""
    if not _NAME.fullmatch(value):
        raise ValueError(
            f"{flag} {value!r}: use letters, digits, '_', '.' and '-' (not first), at most 100"
        )
    return value


def check_study_name(study: str) -> str:
    """A study name is a folder and an MLflow experiment name (so ``--study ../x`` cannot
    leave the storage path)."""
    return _checked_name("--study", study)


def check_register_name(name: str) -> str:
    """A registered model name, checked before the search runs (MLflow refused ``../x`` only
    after it)."""
    return _checked_name("--register-name", name)


def check_ray_address(address: str) -> None:
    """``--address host:port`` answers (a cluster's head); 'auto' is left to Ray."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            pass
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ValueError(
            f"--address {address}: no Ray cluster answers there ({reason}); start it "
            "(ray start --head) or pass --address auto on a cluster node"
        ) from None


def local_resources(count_gpus: bool = True) -> dict[str, float]:
    """This machine's cores and the GPUs torch can use; without ``count_gpus`` (no trial asks
    for a GPU) torch is not imported: the driver never builds a model, and torch costs it
    about 1.5 CPU s."""
    if not count_gpus:
        return {"CPU": float(os.cpu_count() or 1), "GPU": 0.0}
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def _search_to_resume(plan: SearchPlan) -> Path:
    study_dir = plan.root / plan.study
    if plan.settings.experiment:
        path = Path(plan.settings.experiment).resolve()
        if search_state.read_state(path).get("status") == search_state.FINISHED:
            raise ValueError(f"search {path} has finished; there is nothing to resume")
        return path
    path = search_state.latest_unfinished(study_dir)
    if path is None:
        running = [p for p in search_state.searches(study_dir) if search_state.is_running(p)]
        hint = f" ({running[-1]} is running now)" if running else ""
        raise ValueError(
            f"no unfinished search of study {plan.study!r} under {study_dir}{hint}; "
            "run without --resume to start one"
        )
    return path


# -- the run ---------------------------------------------------------------------------------------


def run_search(settings: SearchSettings) -> SearchOutcome:
    """Run (or resume) a search and promote its best model; returns where everything is."""
    plan = plan_search(settings)
    if plan.search_dir is None:
        plan.search_dir = search_state.new_search_dir(plan.root / plan.study)
    with search_state.run_lock(plan.search_dir), _sigterm_as_sigint():
        from leadtune.search.cpu import CpuAccount

        account = CpuAccount().start()  # this process and all it starts: server, Ray, trials
        server = None
        tracking_uri = settings.tracking_uri or plan.previous.get("tracking_uri_given")
        if tracking_uri is None and settings.mlflow_server:
            from leadtune.search.tracking import MlflowServer

            _log("starting a local MLflow tracking server (SQLite) ...")
            bound_mlflow_retries()
            server = MlflowServer(
                db_path=plan.root / "mlflow.db", artifacts=plan.root / "mlartifacts"
            ).start()
            tracking_uri = server.uri
        elif tracking_uri is None:
            # Only this driver writes to MLflow (trials report to it through Ray), so the local
            # default is the database itself: no server process, no HTTP round trip per metric.
            tracking_uri = sqlite_uri(plan.root / "mlflow.db")
        try:
            outcome = _execute(plan, tracking_uri, account)
        finally:
            account.close()
            if server is not None:
                server.stop()
    outcome.durable_tracking_uri = (
        sqlite_uri(plan.root / "mlflow.db") if server is not None else tracking_uri
    )
    return outcome


# MLflow's client retries a failed request 7 times with a growing back-off (about 8 minutes in
# all): right for a remote server that restarts, not for the local one leadtune started, whose
# failures (its database on a full disk, the server gone) do not heal by waiting. A user's own
# settings win.
LOCAL_SERVER_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}


def bound_mlflow_retries() -> None:
    for name, value in LOCAL_SERVER_RETRIES.items():
        os.environ.setdefault(name, value)


@contextlib.contextmanager
def _tune_signal_handlers() -> Iterator[None]:
    """Tune replaces the SIGINT (and SIGUSR1) handler for its run and leaves its own in place
    after it: a Ctrl-C during the promotion would then only set a flag nobody reads. Put back
    what was there before."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    names = [signal.SIGINT] + ([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])
    saved = {name: signal.getsignal(name) for name in names}
    try:
        yield
    finally:
        for name, handler in saved.items():
            signal.signal(name, handler)


# How long Tune's controller waits for the next event (a result, a trial starting or ending,
# resources becoming free) before it runs its timed work anyway (time budget, progress table,
# experiment-state save). Tune waits 0.1 s (hard-coded in TuneController.step).
CONTROLLER_WAIT_S = 1.0


@contextlib.contextmanager
def patient_controller(wait_s: float = CONTROLLER_WAIT_S) -> Iterator[None]:
    """While Tune runs, its controller waits up to ``wait_s`` for the next event instead of
    0.1 s. Every event still wakes it at once (Ray's wait returns on the first ready result,
    trial start or free resources), so only its timed work runs later: the time budget stops
    the search up to ``wait_s`` later, the progress table and the state saves keep their own
    periods. Each empty wake-up costs the driver about 1 ms of CPU (Ray's wait and the step's
    bookkeeping): at 0.1 s that was ~1.2 CPU s of a 2.5-minute demo, a tenth of what the
    search spent beyond its trials. Ray's actor manager (``ray.air.execution._internal``, Ray
    pinned in pyproject.toml) has no setting for it, so its ``next`` gets a lower bound on the
    wait for this run only; on a Ray without that method Tune runs as it is."""
    from ray.air.execution._internal import actor_manager

    manager = getattr(actor_manager, "RayActorManager", None)
    original = getattr(manager, "next", None)
    if manager is None or original is None:
        yield
        return

    def next_event(self: Any, timeout: float | None = None) -> bool:
        return original(self, None if timeout is None else max(timeout, wait_s))

    manager.next = next_event
    try:
        yield
    finally:
        manager.next = original


@contextlib.contextmanager
def _quiet_sql_store() -> Iterator[None]:
    """MLflow's SQL store logs a failed write with its traceback before raising it; where the
    failure is expected (the database on a full disk) the one line the search prints says it."""
    import logging

    store_log = logging.getLogger("mlflow.store.db.utils")
    level = store_log.level
    store_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        store_log.setLevel(level)


def _stopped_on_full_disk(plan: SearchPlan, client: Any, parent_run_id: str,
                          exc: BaseException) -> None:  # fmt: skip
    """The storage path is full: leave the search interrupted (the state file first, written in
    place if need be), tell MLflow if it still answers, and say so in one line (exit 3)."""
    from leadtune.search.faults import Interrupted, describe

    message = describe(exc, plan.search_dir)
    with contextlib.suppress(Exception):
        search_state.write_state(plan.search_dir, status=search_state.INTERRUPTED)
    with contextlib.suppress(Exception), _quiet_sql_store():
        client.set_terminated(parent_run_id, "FAILED")
    raise Interrupted(
        f"search stopped, {message}; free space there, then: leadtune search --study "
        f"{plan.study} --storage-path {plan.settings.storage_path} --resume"
    ) from None


def _execute(plan: SearchPlan, tracking_uri: str, account: Any) -> SearchOutcome:
    os.environ[TRACKING_URI_ENV] = tracking_uri
    # The classic reporter: one compact trial table every 20 s instead of a box per result.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    use_tracking_uri(tracking_uri)
    client = mlflow_client(tracking_uri)

    _log(f"loading data from {plan.settings.data.source} ...")
    data, dataset = plan.spec.load_data(plan.settings.data)
    fingerprint = str(getattr(dataset, "fingerprint", "unknown"))
    if plan.resumed and fingerprint != plan.previous.get("data_fingerprint"):
        raise ValueError(
            f"the data at {plan.settings.data.source} (fingerprint {fingerprint[:12]}) is not "
            f"what the search used ({str(plan.previous.get('data_fingerprint'))[:12]}); resume "
            "with the same --source and --limit"
        )
    experiment_id, parent_run_id = _parent_run(plan, client, tracking_uri, fingerprint)
    _runs_view(plan, client, experiment_id)
    source = str(plan.settings.data.source)
    if not plan.resumed:
        client.log_inputs(parent_run_id, datasets=[dataset_input(dataset, source, "training")])
    search_state.write_state(
        plan.search_dir,
        status=search_state.RUNNING,
        task=plan.spec.name,
        study=plan.study,
        space=plan.space.name,
        metric=plan.metric,
        mode=plan.mode,
        objective=plan.objective,
        objectives=[list(o) for o in plan.objectives],
        budgets=[list(b) for b in plan.budgets],
        trials_requested=plan.previous.get("trials_requested", plan.settings.trials),
        time_budget_s=plan.previous.get("time_budget_s", plan.settings.time_budget_s),
        fixed=plan.fixed,
        parent_run_id=parent_run_id,
        experiment_id=experiment_id,
        tracking_uri_given=plan.previous.get("tracking_uri_given", plan.settings.tracking_uri),
        optuna_storage=plan.optuna_storage,
        data_source=str(Path(plan.settings.data.source).resolve()),
        data_limit=plan.settings.data.limit,
        data_fingerprint=fingerprint,
        register_name=plan.register_name,
        driver_pid=os.getpid(),
    )
    started = time.perf_counter()
    monitor = _system_metrics(plan, parent_run_id, tracking_uri)
    trial_callback = None
    try:
        _start_ray(plan)
        trial_input = dataset_input(dataset, source, "training")
        tuner, trial_callback = _build_tuner(
            plan,
            data,
            tracking_uri,
            experiment_id,
            parent_run_id,
            trial_input,
            fingerprint,
            account,
        )
        _log(
            f"search {plan.study} ({plan.spec.name}): {plan.settings.trials} trial(s), up to "
            f"{plan.settings.max_concurrent} at once; MLflow experiment {experiment_id}, parent "
            f"run {parent_run_id}"
        )
        from leadtune.trainables.runtime import settle_heap

        settle_heap()  # set up: what the driver holds now stays (see leadtune.cli)
        with _tune_signal_handlers(), _own_result_loggers(plan), patient_controller():
            grid = tuner.fit()
    except BaseException as exc:
        from leadtune.search.faults import is_disk_full

        if is_disk_full(exc):
            _stopped_on_full_disk(plan, client, parent_run_id, exc)
        elif trial_callback is not None:
            # Tune writes what its callbacks keep back when it winds down, unless a second
            # Ctrl-C cut that short; a resume would also write it (from result.json)
            with contextlib.suppress(Exception):
                trial_callback.write_kept_back()
        # The search itself broke (not a trial): leave it resumable and say so in MLflow.
        client.set_terminated(parent_run_id, "FAILED")
        search_state.write_state(plan.search_dir, status=search_state.INTERRUPTED)
        raise
    finally:
        if monitor is not None:
            monitor.finish()
    from mlflow.entities import Metric

    try:
        outcome = _conclude(plan, grid, client, tracking_uri, experiment_id, parent_run_id, started)
    except Exception as exc:
        from leadtune.search.faults import is_disk_full

        if is_disk_full(exc):
            _stopped_on_full_disk(plan, client, parent_run_id, exc)
        raise
    # what the search cost beyond its trials, up to here (promotion is the test fold's work)
    outcome.cpu = account.stop()
    now = int(time.time() * 1000)
    client.log_batch(
        parent_run_id,
        metrics=[Metric(k, v, now, 0) for k, v in outcome.cpu.metrics().items()],
    )
    search_state.write_state(plan.search_dir, cpu_seconds=outcome.cpu.seconds)
    _log(outcome.cpu.sentence())
    if outcome.status == search_state.FINISHED and outcome.best and plan.settings.promote:
        from leadtune.search.faults import Interrupted
        from leadtune.search.promote import promote_best

        try:
            outcome.promotion = promote_best(
                tracking_uri=tracking_uri,
                experiment_path=plan.search_dir,
                dataset=dataset,
                register_name=plan.register_name,
            )
        except KeyboardInterrupt:
            raise Interrupted(
                f"interrupted during the promotion; the search has finished, finish the "
                f"promotion with: leadtune promote --study {plan.study} --storage-path "
                f"{plan.settings.storage_path}"
            ) from None
    return outcome


def _system_metrics(plan: SearchPlan, parent_run_id: str, tracking_uri: str) -> Any:
    """With --system-metrics: MLflow's monitor logging this machine's CPU, memory (and GPU)
    use to the parent run every 10 s while the trials run."""
    if not plan.settings.system_metrics:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(parent_run_id, sampling_interval=10, tracking_uri=tracking_uri)
    monitor.start()
    return monitor


def _parent_run(plan: SearchPlan, client: Any, tracking_uri: str, fingerprint: str):
    """(experiment id, parent run id): the resumed search's, or a new parent run."""
    from leadtune.search.tracking import TASK_TAG, ensure_experiment, flat_params, git_commit

    if plan.resumed:
        parent = plan.previous["parent_run_id"]
        client.update_run(parent, status="RUNNING")
        return plan.previous["experiment_id"], parent
    with search_state.file_lock(plan.root / f".{plan.study}.lock", f"study {plan.study}"):
        experiment_id = ensure_experiment(client, plan.study, tracking_uri)
    parent = client.create_run(
        experiment_id,
        run_name=plan.search_dir.name,
        tags={
            "leadtune.kind": "search",
            TASK_TAG: plan.spec.name,
            "leadtune.space": plan.space.name,
            "leadtune.study": plan.study,
            "leadtune.data_fingerprint": fingerprint,
            "leadtune.experiment_path": str(plan.search_dir),
            "leadtune.optuna_storage": plan.optuna_storage,
            "mlflow.source.git.commit": git_commit(),
            "mlflow.source.name": "leadtune search",
            "mlflow.source.type": "LOCAL",
            "mlflow.note.content": plan.space.description,
        },
    )
    settings = {
        k: v
        for k, v in asdict(plan.settings).items()
        if k not in ("overrides", "data", "resume", "experiment")
    }
    sched = scheduler_plan(plan)
    settings.update(  # as the search runs them, not as given (None: the space's default)
        metric=plan.metric, mode=plan.mode, study=plan.study, tracking_uri=tracking_uri,
        storage_path=str(plan.root), optuna_storage=plan.optuna_storage,
        scheduler=sched.name, fidelity=sched.fidelity, grace_period=sched.grace_period,
        reduction_factor=sched.reduction_factor, register_name=plan.register_name,
        objective=[f"{m}:{mode}" for m, mode in plan.objectives] or None,
    )  # fmt: skip
    settings.update({f"fixed.{k}": v for k, v in plan.fixed.items()})
    settings.update(
        {"data.source": plan.settings.data.source, "data.limit": plan.settings.data.limit}
    )
    for key, value in flat_params(settings).items():
        client.log_param(parent.info.run_id, key, value)
    client.log_text(parent.info.run_id, _space_source(plan.space), "space.py")
    return experiment_id, parent.info.run_id


def _start_ray(plan: SearchPlan) -> None:
    """Join the cluster (``--address``) or start a local Ray with token authentication (its
    servers listen on the machine's network; without the token nobody can use them)."""
    import ray

    from leadtune.trainables.runtime import ray_runtime_env

    settings = plan.settings
    local = settings.address is None
    if not ray.is_initialized():
        if local and not os.environ.get("RAY_AUTH_MODE"):
            enable_ray_token_auth()
        # without --address, ray.init still joins a Ray it finds (RAY_ADDRESS, or one `ray
        # start` left on this machine): only a Ray it starts itself is started lean
        own = local and not _finds_running_ray()
        if local:
            # Ray starts one idle worker per CPU for the driver's job; Tune never uses them (each
            # trial is an actor with its own worker), so on a laptop they only cost CPU to start.
            os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
        with _lean_local_node(own):
            ray.init(
                address=settings.address,
                include_dashboard=False,
                configure_logging=True,
                logging_level="WARNING",
                log_to_driver=False,
                runtime_env=ray_runtime_env(settings.gpus_per_trial),  # allocator env, GPU share
                # a local Ray without a dashboard has nobody to read its metrics (their agents
                # cost ~1 CPU s a minute); a cluster's are the cluster's to set
                _system_config={"enable_metrics_collection": False} if own else None,
            )
    check_resources(settings, ray.cluster_resources())


def _finds_running_ray() -> bool:
    """Whether ``ray.init()`` without an address would join a running Ray instead of starting
    one (Ray's own lookup: ``RAY_ADDRESS``, then the last ``ray start`` on this machine)."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        return canonicalize_bootstrap_address(None) is not None
    except Exception:  # Ray could not tell: ray.init will decide, and say so itself
        return False


@contextlib.contextmanager
def _lean_local_node(local: bool) -> Iterator[None]:
    """While a local Ray starts, leave out three of its head's processes that such a search
    never uses: the log monitor (it forwards workers' output to drivers that ask for it; ours
    passes ``log_to_driver=False``), the autoscaler monitor (a local Ray cannot grow) and the
    dashboard head, which ``include_dashboard=False`` still starts for Ray's job and state APIs
    (``ray job``, ``ray list``; Tune and leadtune use neither, and a Ray that a search started
    ends with it), where Ray runs its minimal agents (no dashboard extras, as leadtune
    installs it). Together they cost about 3 CPU s on the demo. ``ray.init`` has no switch for
    them, so the head's parameters (``ray._private.parameter.RayParams``) get the first two and
    the node (``ray._private.node.Node``) does not start the third, for this call only (Ray
    pinned in pyproject.toml); on a Ray without those names the head starts as Ray's default.
    A cluster (``--address``) is left as it is."""
    from ray._private import node, parameter

    original = parameter.RayParams
    fields = set(inspect.signature(original).parameters)
    start_api_server = getattr(node.Node, "start_api_server", None)
    if not local or not {"include_log_monitor", "no_monitor"} <= fields:
        yield
        return

    class LeanRayParams(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("include_log_monitor", False)
            kwargs.setdefault("no_monitor", True)
            super().__init__(*args, **kwargs)

    def no_api_server(self: Any, *, include_dashboard: bool | None, **_: Any) -> None:
        if include_dashboard and start_api_server is not None:  # asked for: Ray's own
            start_api_server(self, include_dashboard=include_dashboard, **_)

    # With Ray's dashboard extras installed (ray[default]) its agents are the full ones, and
    # one of them asks for the dashboard head's address every second until it finds it: the
    # head stays then.
    skip_head = start_api_server is not None and _minimal_ray()
    parameter.RayParams = LeanRayParams
    if skip_head:
        node.Node.start_api_server = no_api_server  # type: ignore[method-assign]
    try:
        yield
    finally:
        parameter.RayParams = original
        if skip_head:
            node.Node.start_api_server = start_api_server  # type: ignore[method-assign]


def _minimal_ray() -> bool:
    """Whether Ray runs its minimal agents here (its dashboard extras are not installed; the
    test Ray itself uses when it starts them)."""
    try:
        from ray._private.utils import get_dashboard_dependency_error
    except ImportError:
        return False
    return get_dashboard_dependency_error() is not None


def enable_ray_token_auth() -> None:
    """Token authentication for a local Ray: a random token in this process's environment,
    which the Ray processes it starts (and their workers) inherit. Ray reads its settings when
    imported, so they are re-read here."""
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    from ray._raylet import Config  # Ray's own way to refresh them (it does this itself)

    Config.initialize("")


def check_resources(settings: SearchSettings, available: dict[str, float]) -> None:
    """A trial that needs more than the cluster has can never start: say so now (a local Ray
    cannot grow; a cluster with an autoscaler may, so there it is a warning)."""
    wanted = {"CPU": settings.cpus_per_trial, "GPU": settings.gpus_per_trial}
    short = {k: v for k, v in wanted.items() if v > available.get(k, 0.0) + 1e-9}
    if not short:
        return
    have = ", ".join(f"{available.get(k, 0.0):g} {k}" for k in short)
    need = ", ".join(f"{v:g} {k}" for k, v in short.items())
    if settings.address is None:
        flag = "--gpus-per-trial" if "GPU" in short else "--cpus-per-trial"
        raise ValueError(
            f"each trial asks for {need}, but this machine has {have}; lower {flag} or join a "
            "cluster that has them (--address)"
        )
    _log(
        f"warning: each trial asks for {need}, the cluster has {have} now; trials wait until "
        "the autoscaler adds such nodes (Ctrl-C to stop; the search stays resumable)"
    )


def _build_tuner(plan: SearchPlan, data: Any, tracking_uri: str, experiment_id: str,
                 parent_run_id: str, trial_input: Any = None,
                 fingerprint: str = "unknown", account: Any = None) -> tuple[Any, Any]:  # fmt: skip
    """The Tuner (a new one, or the resumed search's) and the MLflow callback it will run (None
    if a resumed search's could not be found)."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from leadtune.search.callback import MlflowTrialCallback, TrialPidCallback
    from leadtune.search.cpu import activate
    from leadtune.search.searcher import make_searcher
    from leadtune.search.study import SpaceWithFixed, open_study

    settings = plan.settings
    if account is not None:  # (a resumed search restores its callbacks, this one included)
        activate(account)
    trainable = tune.with_resources(
        tune.with_parameters(
            _trial_entry,
            data=data,
            task=plan.spec.name,
            metric=plan.metric,
            mode=plan.mode,
            objectives=tuple(plan.objectives),
        ),
        {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial},
    )
    if plan.resumed:
        from leadtune.search.tune_state import repair

        _log(f"resuming {plan.search_dir}")
        repaired = repair(plan.search_dir)
        if repaired:
            _log(repaired)
        restored = tune.Tuner.restore(
            str(plan.search_dir), trainable=trainable, resume_unfinished=True, resume_errored=True
        )
        # the callback Tune runs is the one it restored (Tuner keeps it in its run config)
        config = getattr(getattr(restored, "_local_tuner", None), "_run_config", None)
        found = [c for c in getattr(config, "callbacks", None) or []
                 if isinstance(c, MlflowTrialCallback)]  # fmt: skip
        return restored, (found[0] if found else None)
    with search_state.file_lock(plan.root / f".{plan.study}.lock", f"study {plan.study}"):
        keys, modes = plan.optuna_objectives
        budget = {"data": fingerprint, "fixed": plan.fixed, "objective": plan.objective,
                  "space": plan.space.name}  # fmt: skip
        if plan.objectives:
            budget["objectives"] = keys
        _, seed, warmed = open_study(
            plan.optuna_storage, plan.study, modes if plan.objectives else plan.mode,
            plan.space.initial_points, settings.seed, keys if plan.objectives else plan.objective,
            budget, settings.warm_start, settings.warm_start_trials,
        )  # fmt: skip
        if warmed:
            _log(
                f"warm start from study {warmed['from']}: its best trial(s) "
                f"{warmed['trials']}, {warmed['how']}"
            )
    searcher = make_searcher(
        SpaceWithFixed(plan.space.define, plan.fixed),
        keys if plan.objectives else plan.objective, modes if plan.objectives else plan.mode,
        plan.optuna_storage, plan.study, seed, plan.search_dir.name, plan.search_dir,
    )  # fmt: skip
    scheduler = make_scheduler(scheduler_plan(plan))
    callback = MlflowTrialCallback(
        tracking_uri, experiment_id, parent_run_id, plan.search_dir, plan.spec.name, plan.metric,
        dataset_input=trial_input,
    )  # fmt: skip
    reporter = _StderrReporter(
        metric_columns={
            "epoch": "epoch",
            plan.objective: plan.objective,
            **{column.key: column.label for column in plan.spec.table_metrics},
        },
        # only parameters every trial has: the reporter fails on conditional ones (depth, heads)
        parameter_columns=list(plan.space.table_params or plan.spec.table_params),
        max_report_frequency=20,
        # not sorted: Ray's reporter sorts finished trials by the metric and fails (TypeError on
        # None) when one ended before reporting it, e.g. stopped by the time budget (seen in
        # tests/test_search.py::test_trials_the_time_budget_stops_are_pruned_not_failed)
        sort_by_metric=False,
    )
    tuner = tune.Tuner(
        trainable,
        param_space={**plan.defaults, **plan.fixed},
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=settings.max_concurrent),
            scheduler=scheduler,
            metric=plan.objective,
            mode=plan.mode,
            num_samples=settings.trials,
            time_budget_s=settings.time_budget_s,
            trial_name_creator=_TrialName(plan.spec.name),
            trial_dirname_creator=_TrialName(plan.spec.name),
        ),
        run_config=tune.RunConfig(
            name=plan.search_dir.name,
            storage_path=str(plan.search_dir.parent),
            failure_config=tune.FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=settings.keep_checkpoints,
                checkpoint_score_attribute=plan.metric,  # each epoch's own value
                checkpoint_score_order=plan.mode,
            ),
            callbacks=[callback, TrialPidCallback(), *_result_files()],
            progress_reporter=reporter,
            verbose=1,
        ),
    )
    return tuner, callback


@contextlib.contextmanager
def _own_result_loggers(plan: SearchPlan) -> Iterator[None]:
    """While Tune runs: no loggers of its own (``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS``): the
    search's callbacks hold the CSV and JSON ones (:func:`_result_files`; a resumed search
    restores them). A search started by an older leadtune has only Tune's automatic loggers
    (its trial folders hold TensorBoard files): resumed, it keeps them. The variable is put
    back afterwards."""
    old_style = plan.resumed and any(plan.search_dir.glob("*/events.out.tfevents*"))
    name = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"
    before = os.environ.get(name)
    if not old_style:
        os.environ[name] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _result_files() -> list[Any]:
    """Tune's per-trial ``progress.csv`` and ``result.json`` (its ResultGrid, and so
    ``leadtune report``, reads them), without the TensorBoard event files Tune also writes by
    default: MLflow holds every metric, and Tune's TensorBoard logger imports torch into the
    driver (about 1.5 CPU s on a 2.5-minute demo)."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    return [CSVLoggerCallback(), JsonLoggerCallback()]


@dataclass
class SchedulerPlan:
    """Which trials stop early, and when: the scheduler, its fidelity unit (``epoch``, or
    ``schedule``: percent of the trial's own epochs), the first judgement (grace period, in that
    unit), the reduction factor and the horizon (``max_t``)."""

    name: str
    fidelity: str
    grace_period: float
    reduction_factor: int
    max_t: float

    def describe(self) -> str:
        if self.name == "fifo":
            return "fifo (every trial runs to the end)"
        unit = "% of its schedule" if self.fidelity == "schedule" else " epoch(s)"
        return (
            f"{self.name}: first judged at {self.grace_period:g}{unit}, then every x"
            f"{self.reduction_factor} up to {self.max_t:g}{unit.split(' of')[0]}"
        )


def scheduler_plan(plan: SearchPlan) -> SchedulerPlan:
    """The space's scheduler settings with the command line's overrides."""
    settings, space = plan.settings, plan.space
    name = settings.scheduler or space.scheduler
    fidelity = settings.fidelity or space.fidelity
    epochs = int(plan.fixed.get("epochs") or getattr(plan.spec.config_class(), "epochs", 1))
    max_t = 100.0 if fidelity == "schedule" else float(epochs)
    grace = settings.grace_period or space.grace_period
    if grace is None:  # the rule: a quarter of the schedule (see SearchSpace.grace_period)
        grace = 25.0 if fidelity == "schedule" else max(1.0, math.ceil(epochs / 4))
    if grace > max_t:
        raise ValueError(
            f"--grace-period {grace:g} is beyond the horizon {max_t:g} ({fidelity}); lower it"
        )
    factor = settings.reduction_factor or space.reduction_factor
    return SchedulerPlan(name, fidelity, float(grace), int(factor), max_t)


def make_scheduler(sched: SchedulerPlan) -> Any:
    """Ray Tune's own scheduler for the plan."""
    from ray.tune.schedulers import (
        AsyncHyperBandScheduler,
        FIFOScheduler,
        MedianStoppingRule,
    )

    time_attr = PROGRESS_KEY if sched.fidelity == "schedule" else "epoch"
    if sched.name == "fifo":
        return FIFOScheduler()
    if sched.name == "median":
        return MedianStoppingRule(time_attr=time_attr, grace_period=sched.grace_period,
                                  min_samples_required=3)  # fmt: skip
    brackets = 3 if sched.name == "hyperband" else 1  # asha: one bracket
    return AsyncHyperBandScheduler(
        time_attr=time_attr, max_t=sched.max_t, grace_period=sched.grace_period,
        reduction_factor=sched.reduction_factor, brackets=brackets,
    )  # fmt: skip


def _stderr_reporter_class() -> type:
    from ray import tune

    class StderrReporter(tune.CLIReporter):
        """Tune's trial table on stderr: stdout carries only the result (``--json``)."""

        def _print(self, msg: str) -> None:
            print(tidy_status(msg), file=sys.stderr, flush=True)

    return StderrReporter


# Lines of Tune's status block that say nothing to a user: Ray's temporary session folder (not
# where results go), and ASHA's rung cut-offs (negated for a metric to minimise).
_STATUS_NOISE = ("Result logdir:", "Bracket:")
_LONG_FLOAT = re.compile(r"(?<![\w.])-?\d+\.\d{5,}(?:e[-+]?\d+)?")


def tidy_status(msg: str) -> str:
    """Tune's status block, without its noise lines and with numbers rounded to 4 significant
    digits (it prints 16)."""
    kept = [line for line in msg.splitlines() if not line.startswith(_STATUS_NOISE)]
    return _LONG_FLOAT.sub(lambda m: f"{float(m.group()):.4g}", "\n".join(kept))


def _StderrReporter(**kwargs: Any) -> Any:  # noqa: N802 (a class made when Ray is imported)
    return _stderr_reporter_class()(**kwargs)


# -- the conclusion --------------------------------------------------------------------------------


def _conclude(plan: SearchPlan, grid: Any, client: Any, tracking_uri: str, experiment_id: str,
              parent_run_id: str, started: float) -> SearchOutcome:  # fmt: skip
    """Trial table, the search's status, and the bookkeeping in Optuna, MLflow and the state
    file, whatever way the fit ended."""
    from leadtune.search.callback import end_run
    from leadtune.search.study import (
        fail_orphaned_trials,
        prune_budget_stopped,
        tune_trial_numbers,
    )

    wall = time.perf_counter() - started
    saved = search_state.read_state(plan.search_dir)
    budget = saved.get("time_budget_s")
    budget_spent = budget is not None and saved.get("wall_seconds", 0) + wall >= budget
    runs = trial_runs(client, experiment_id, parent_run_id)
    trials = summarise_trials(
        grid, plan.metric, plan.mode, plan.spec, saved.get("trials", {}), budget_spent, runs,
        plan.objectives,
    )  # fmt: skip
    unfinished = [t for t in trials if t["state"] == "unfinished"]
    missing = saved.get("trials_requested", plan.settings.trials) - len(trials)
    finished = not unfinished and (missing <= 0 or budget_spent)
    status = search_state.FINISHED if finished else search_state.INTERRUPTED

    # A trial that has not reported yet has no config in Tune's results: its Optuna trial
    # number comes from the study, and it is alive all the same (a resume will run it).
    numbers = tune_trial_numbers(plan.optuna_storage, plan.study, plan.search_dir.name)
    for trial in trials:
        if trial["optuna_trial"] is None:
            trial["optuna_trial"] = numbers.get(trial["trial_id"])
    stopped = [t["optuna_trial"] for t in trials if t["state"] == "stopped_by_budget"]
    prune_budget_stopped(plan.optuna_storage, plan.study, [n for n in stopped if n is not None])
    alive = {t["trial_id"] for t in unfinished}
    orphans = fail_orphaned_trials(plan.optuna_storage, plan.study, plan.search_dir.name, alive)
    if orphans:
        _log(f"failed Optuna trial(s) {orphans}: asked for, but no Tune trial will run them")
    # Unfinished trials, and trials the time budget stopped (Tune does not tell the callback of
    # those: their runs would stay RUNNING with no state in MLflow, as a real search showed).
    for trial in trials:
        if trial.get("run_id") and trial["state"] in ("unfinished", "stopped_by_budget"):
            state = "interrupted" if trial["state"] == "unfinished" else "stopped_by_budget"
            epochs = trial.get("epochs_run") if state == "stopped_by_budget" else None
            end_run(client, trial["run_id"], state, epochs, "KILLED")

    ranked = [t for t in trials if t["state"] in search_state.SUCCESSFUL_TRIAL_STATES]
    ranked = [t for t in ranked if t.get("value") is not None]
    best = choose_best(ranked, plan.mode, plan.budgets)  # the one rule (search.objectives)
    if ranked and best is None:
        _log(f"no trial meets the budgets ({within_text(plan.budgets)}); nothing to promote")
    if best is not None:
        client.log_batch(parent_run_id, metrics=_search_metrics(best, plan.metric))
        client.set_tag(parent_run_id, "leadtune.best_trial", best["trial_id"])
    front = _mark_pareto(plan, client, parent_run_id, ranked) if plan.objectives else []
    _log_best_epochs(plan, client, trials)
    _runs_view(plan, client, experiment_id, trials)
    client.log_metric(parent_run_id, "search_wall_seconds", saved.get("wall_seconds", 0) + wall)
    client.set_tag(parent_run_id, "leadtune.status", status)
    client.set_terminated(parent_run_id, "FINISHED" if finished else "KILLED")
    search_state.write_state(
        plan.search_dir,
        status=status,
        wall_seconds=saved.get("wall_seconds", 0) + wall,
        best_trial=best["trial_id"] if best else None,
        pareto_trials=[t["trial_id"] for t in front],
    )
    if not finished:
        _log(
            f"search interrupted: {len(unfinished)} trial(s) unfinished"
            + (f", {missing} not started" if missing > 0 else "")
            + f"; nothing promoted. Finish it with: leadtune search --study {plan.study} "
            f"--storage-path {plan.settings.storage_path} --resume"
        )
    return SearchOutcome(
        study=plan.study,
        task=plan.spec.name,
        experiment_path=plan.search_dir,
        tracking_uri=tracking_uri,
        experiment_id=experiment_id,
        parent_run_id=parent_run_id,
        metric=plan.metric,
        mode=plan.mode,
        status=status,
        trials=trials,
        best=best,
        objectives=list(plan.objectives),
        budgets=list(plan.budgets),
    )


def _mark_pareto(plan: SearchPlan, client: Any, parent_run_id: str, ranked: list) -> list:
    """The Pareto front of the trials that ran their whole budget (Optuna's COMPLETE trials, the
    ones its own front is drawn from), on every objective at each trial's best epoch: marked on
    the rows (``pareto``) and on their MLflow runs (``leadtune.pareto``)."""
    full = [t for t in ranked if t["state"] in ("completed", "early_stopped_patience")]
    front = pareto_front(full, [(plan.metric, plan.mode), *plan.objectives])
    on_front = {t["trial_id"] for t in front}
    for trial in ranked:
        trial["pareto"] = trial["trial_id"] in on_front
        if trial.get("run_id"):
            client.set_tag(trial["run_id"], "leadtune.pareto", str(trial["pareto"]).lower())
    client.log_metric(parent_run_id, "search_pareto_size", len(front))
    names = " / ".join(f"{m} ({mode})" for m, mode in [(plan.metric, plan.mode), *plan.objectives])
    _log(f"Pareto front on {names}: trial(s) {', '.join(sorted(on_front)) or 'none'}")
    return front


def _runs_view(plan: SearchPlan, client: Any, experiment_id: str,
               trials: list[dict[str, Any]] | None = None) -> None:  # fmt: skip
    """The columns the experiment's link opens on: the searched metric, the task's table
    figures, and the parameters (the space's table ones while it runs; at the end, those that
    differ between its trials)."""
    from leadtune.search.tracking import set_runs_view

    params = list(plan.space.table_params or plan.spec.table_params)
    configs = [t["config"] for t in trials or () if t.get("config")]
    if len(configs) > 1:
        keys = sorted({key for config in configs for key in config})
        varied = [
            key
            for key in keys
            if len({json.dumps(c.get(key), sort_keys=True, default=str) for c in configs}) > 1
        ]
        params = [p for p in params if p in varied] + [k for k in varied if k not in params]
    # the trials' best-epoch figures once the search has logged them (see _log_best_epochs)
    prefix = "best_" if trials else ""
    metrics = [prefix + column.key for column in plan.spec.table_metrics]
    metrics += [name for name, _ in plan.objectives]  # further objectives (their last value)
    set_runs_view(client, experiment_id, plan.metric, plan.mode, metrics, params)


def _log_best_epochs(plan: SearchPlan, client: Any, trials: list[dict[str, Any]]) -> None:
    """Each child run gets its best epoch's table figures as ``best_<metric>`` (step = that
    epoch): MLflow's columns then show the numbers the trial table and the report show, not the
    last epoch's."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    for trial in trials:
        if not trial.get("run_id") or trial.get("best_epoch") is None:
            continue
        values = [
            Metric(f"best_{c.key}", float(trial[c.key]), now, int(trial["best_epoch"]))
            for c in plan.spec.table_metrics
            if c.key != plan.metric and finite(trial.get(c.key))  # best_<metric>: the trainable's
        ]
        if values:
            client.log_batch(trial["run_id"], metrics=values)


def _search_metrics(best: dict[str, Any], metric: str) -> list:
    from mlflow.entities import Metric

    from leadtune.search.tracking import PARENT_METRIC_PREFIX

    now = int(time.time() * 1000)
    values = {metric: best["value"]}
    values.update({k: v for k, v in best.items() if k.startswith("val_") and finite(v)})
    return [Metric(PARENT_METRIC_PREFIX + k, float(v), now, 0) for k, v in values.items()]


def _space_source(space: Any) -> str:
    import inspect

    try:
        return inspect.getsource(inspect.getmodule(space.define))
    except (OSError, TypeError):
        return repr(space)
