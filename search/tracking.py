"""MLflow for searches: the local tracking server (tied to the driver's life), one parent run per
search, one child run per trial (kept across resumes), and the Tune callback that writes them.

Names: a trial's child run logs its per-epoch metrics under the task's names (``val_loss`` ...;
step = epoch); the search's parent run logs the best trial's figures
as ``search_best_<metric>``, so the two never share a name in MLflow's chart view. Bookkeeping
(epoch, checkpoint flags, node ids) goes to tags, not metrics.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRIAL_TAG = "leadtune.trial_id"
STATE_TAG = "leadtune.state"
OPTUNA_TAG = "leadtune.optuna_trial"
TASK_TAG = "leadtune.task"
TRACKING_URI_ENV = "LEADTUNE_MLFLOW_TRACKING_URI"
PARENT_METRIC_PREFIX = "search_best_"


# -- the tracking URI ----------------------------------------------------------------------------


def mlflow_client(uri: str) -> Any:
    """A client whose runs *and* registry live at ``uri``.

    ``MlflowClient(uri)`` alone takes its registry from the process-wide registry URI, which an
    earlier command in the same process (``evaluate models:/...``, a notebook) may have pointed
    elsewhere; then a promotion would register into another database."""
    from mlflow.tracking import MlflowClient

    if not uri.startswith("sqlite:///") or uri in _SQLITE_READY:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    # Two processes creating (or upgrading) the same new database at once fail in MLflow's
    # migrations; the first to hold the lock does it, the other then finds it done.
    from leadtune.trainables.runtime import file_lock

    db = Path(uri[len("sqlite:///") :])
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(
                file_lock(db.with_name(db.name + ".lock"), f"another process to set up {db}")
            )
        except OSError:  # a folder this process cannot write to: a database it only reads
            return MlflowClient(tracking_uri=uri, registry_uri=uri)
        template = schema_template()
        new = not db.exists()
        copied = new and _copy_template(template, db)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)
        if new and not copied:
            _save_template(db, template)
    _SQLITE_READY.add(uri)
    return client


_SQLITE_READY: set[str] = set()


# -- a new SQLite database from a migrated empty one ----------------------------------------------
#
# MLflow builds a new database by running every one of its schema migrations (alembic, ~60
# scripts: about 0.9 CPU s, a tenth of what a 2.5-minute demo search spends outside its trials).
# The result depends only on MLflow's version, so the first new database a user's MLflow version
# makes is kept, empty, in leadtune's cache, and later new databases start as a copy of it.
# MLflow still checks the copy's schema revision when it opens it; tests/test_tracking.py holds
# a copy equal to a migrated database, table by table.


def schema_template() -> Path:
    """Where this MLflow version's empty, migrated database is kept."""
    import mlflow

    from leadtune.trainables.data.cache import default_cache_root

    return default_cache_root() / "mlflow-schema" / f"mlflow-{mlflow.__version__}.db"


def _copy_template(template: Path, db: Path) -> bool:
    """Start ``db`` as a copy of ``template``; False (nothing written) when there is none."""
    import sqlite3

    if not template.is_file():
        return False
    try:
        with contextlib.closing(sqlite3.connect(template)) as source:
            with contextlib.closing(sqlite3.connect(db)) as target:
                source.backup(target)
                # MLflow's Default experiment points at ./mlruns/0 of the process that made the
                # database, created then: make it this one's, as a migration here would have.
                now_ms = int(time.time() * 1000)
                target.execute(
                    "UPDATE experiments SET artifact_location = ?, creation_time = ?, "
                    "last_update_time = ? WHERE experiment_id = 0",
                    (os.path.join(os.path.abspath("mlruns"), "0"), now_ms, now_ms),
                )
                target.commit()
    except sqlite3.Error:  # an unreadable template: migrate as MLflow does
        db.unlink(missing_ok=True)
        return False
    return True


def _save_template(db: Path, template: Path) -> None:
    """Keep a copy of the just-migrated, still empty ``db`` (best effort: a read-only cache
    only means the next new database migrates too)."""
    import sqlite3

    part = template.with_name(f"{template.name}.{os.getpid()}.part")
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(sqlite3.connect(db)) as source:
            with contextlib.closing(sqlite3.connect(part)) as target:
                source.backup(target)
        part.replace(template)
    except (OSError, sqlite3.Error):
        part.unlink(missing_ok=True)


def use_tracking_uri(uri: str) -> None:
    """Point MLflow's process-wide tracking and registry URIs at ``uri`` (both, always)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


def check_tracking_uri(uri: str | None, what: str) -> str:
    """Fail fast (one line) on a missing database or a server that does not answer."""
    if not uri:
        raise ValueError(
            f"{what} needs an MLflow tracking URI; pass --tracking-uri (e.g. "
            "sqlite:///runs/search/mlflow.db or http://host:5000)"
        )
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///") :]).parent
        if not folder.is_dir():
            raise ValueError(f"MLflow database folder {folder} (from {uri}) does not exist")
    elif uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as response:
                ok = response.status == 200
        except OSError as exc:
            reason = getattr(exc, "reason", exc)
            raise ValueError(
                f"MLflow server at {uri} does not answer ({reason}); start it or pass another "
                "--tracking-uri"
            ) from None
        if not ok:
            raise ValueError(f"MLflow server at {uri} is not healthy; check the server")
    elif uri.split(":", 1)[0].split("+")[0] in ("postgresql", "postgres", "mysql", "mssql"):
        from sqlalchemy.engine import make_url

        try:
            parsed = make_url(uri)
        except Exception:
            raise ValueError(f"{what} {uri!r} is not a database URL") from None
        check_database_driver(parsed, what)
    elif "://" not in uri:
        raise ValueError(
            f"tracking URI {uri!r} has no scheme; use sqlite:///ABSOLUTE/PATH/mlflow.db, "
            "http://host:5000 or postgresql://..."
        )
    return uri


# pip packages of the drivers SQLAlchemy loads, by the module it imports
_DRIVER_PACKAGES = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary",
                    "MySQLdb": "mysqlclient", "pymysql": "pymysql"}  # fmt: skip


def check_database_driver(parsed: Any, flag: str) -> None:
    """That the Python driver of a database URL is installed: without it SQLAlchemy fails
    before it reaches the server, and the server is not to blame."""
    try:
        parsed.get_dialect().import_dbapi()
    except ImportError as exc:
        module = getattr(exc, "name", None) or str(exc)
        package = _DRIVER_PACKAGES.get(module, module)
        raise ValueError(
            f"{flag} {parsed.render_as_string(hide_password=True)}: the {parsed.get_backend_name()}"
            f" driver ({module}) is not installed; install it into leadtune's environment "
            f"(pip install '{package}') and run again"
        ) from None
    except Exception:  # an unknown dialect: the connection attempt names it
        return


def sqlite_uri(path: Path) -> str:
    """``sqlite:///`` URI of a database file, absolute whatever the path given."""
    return f"sqlite:///{Path(path).resolve()}"


# -- the local server ----------------------------------------------------------------------------


def server_environment() -> dict[str, str]:
    """The local server's environment: MLflow's job runner off unless asked for.

    MLflow 3 starts a huey job runner beside the server (about eight consumer processes, each
    polling at a few % of a core) for GenAI evaluation jobs and trace roll-ups; leadtune logs
    runs, metrics, artefacts and models, none of which uses it, and on a 2-core machine they cost
    the trials several % of the CPU. ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true`` in the
    environment turns it back on."""
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class MlflowServer:
    """An ``mlflow server`` on 127.0.0.1 backed by SQLite, started and stopped by leadtune.

    It runs under a small watchdog process (``python -m leadtune.search.tracking``) in its own
    process group: the watchdog ends the whole group when the driver that started it exits, even
    when the driver is killed and runs no cleanup. Servers of concurrent searches on one database
    start one after another (a lock beside the database), so two never migrate it at once.
    """

    db_path: Path
    artifacts: Path
    port: int = 0
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> MlflowServer:
        from leadtune.search.state import file_lock

        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.log_path = self.db_path.parent / "mlflow-server.log"
        with file_lock(
            self.db_path.with_name(self.db_path.name + ".lock"),
            f"another MLflow server to finish setting up {self.db_path}",
        ):
            self.port = self.port or _free_port()
            command = [
                sys.executable, "-m", "leadtune.search.tracking", str(os.getpid()), "--",
                sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", sqlite_uri(self.db_path),
                # Artifacts as plain file URIs (not proxied through the server), so registered
                # models still load through the SQLite database after this server has stopped.
                "--default-artifact-root", self.artifacts.resolve().as_uri(),
                "--no-serve-artifacts",
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            ]  # fmt: skip
            log = open(self.log_path, "ab")  # noqa: SIM115 (closed with the process)
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=server_environment(),
            )
            self._wait_healthy(timeout_s)
        return self

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited at start (code {self.process.returncode}); "
                    f"see {self.log_path}"
                )
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(
            f"mlflow server did not answer within {timeout_s:.0f} s; see {self.log_path}"
        )

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()  # the watchdog ends the server's whole process group
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None


def _watch(parent: int, command: list[str]) -> int:
    """Run ``command`` in a new process group; end the group when ``parent`` exits or when this
    watchdog is asked to stop. Returns the command's exit code."""
    child = subprocess.Popen(command, start_new_session=True)
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    orphaned = False
    while child.poll() is None and not stopping:
        if os.getppid() != parent:  # the driver is gone (re-parented to init)
            orphaned = True
            break
        time.sleep(0.2)
    if child.poll() is None:
        # a killed driver waits for nothing: SQLite's transactions keep the database whole, so
        # the server gets 2 s to stop, not the 15 s of an orderly stop
        _end_group(child, grace_s=2.0 if orphaned else 15.0)
    return child.returncode or 0


def _end_group(child: subprocess.Popen, grace_s: float = 15.0) -> None:
    try:
        os.killpg(child.pid, signal.SIGTERM)
        child.wait(timeout=grace_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(child.pid, signal.SIGKILL)  # whatever of the group is left
    except ProcessLookupError:
        pass
    child.wait()


# -- experiments and runs ------------------------------------------------------------------------


def artifact_location_for(tracking_uri: str) -> str | None:
    """Where a new experiment keeps artifacts when the tracking URI is a database file.

    A server decides for itself (None); for ``sqlite:///x/mlflow.db`` it is ``x/mlartifacts``,
    so artifacts never land in whatever folder the command was started from.
    """
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()
    return None


# Tells MLflow's UI this is model training, not a GenAI app (MLflow 3 otherwise guesses).
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


# The runs table a search's link opens: MLflow (>= 3.15) reads a shared view's columns, their
# order and the sort order from the experiment tag ``mlflow.sharedViewState.<key>`` when the
# page's URL carries ``viewStateShareKey=<key>``. Without it the table shows no metric or
# parameter column until the user picks them.
RUNS_VIEW_KEY = "leadtune"
RUNS_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW_KEY}"


def runs_view_state(metric: str, mode: str, metrics: list[str], params: list[str]) -> str:
    """The shared view of a search's runs: each trial's best value of the searched metric
    first (the sort order), then ``metrics`` (the task's other figures) and ``params``, and the
    search's own best value last (on the parent run)."""
    best = f"metrics.`best_{metric}`"
    # how each trial ended and after how many epochs (a trial ASHA stopped at epoch 3 and one
    # that ran 40 both show MLflow's green "Finished")
    ended = ["tags.`leadtune.state`", "tags.`leadtune.epochs_run`"]
    columns = [best, *ended, *(f"metrics.`{m}`" for m in metrics)]
    columns += [f"params.`{p}`" for p in params]
    columns.append(f"metrics.`{PARENT_METRIC_PREFIX}{metric}`")
    columns = list(dict.fromkeys(columns))
    state = {
        "selectedColumns": columns,
        "columnOrder": columns,
        "orderByKey": best,
        "orderByAsc": mode == "min",
    }
    return json.dumps(state, separators=(",", ":"))


def set_runs_view(client: Any, experiment_id: str, metric: str, mode: str, metrics: list[str],
                  params: list[str]) -> None:  # fmt: skip
    """Write (or replace) the experiment's shared runs view (see :func:`runs_view_state`)."""
    client.set_experiment_tag(
        experiment_id, RUNS_VIEW_TAG, runs_view_state(metric, mode, metrics, params[:16])
    )


def ui_url(base: str, experiment_id: str | None = None, run_id: str | None = None,
           model: str | None = None) -> str:  # fmt: skip
    """A page of MLflow's UI in its model-training mode: an experiment's runs (in the search's
    shared view, :func:`set_runs_view`), one run, or a registered model. MLflow 3.17's UI shows
    every experiment in its GenAI mode (traces overview) unless the page's ``workflowType`` says
    otherwise or the user switched once; the experiment's ``mlflow.experimentKind`` tag does not
    decide it."""
    query = "workflowType=machine_learning"
    if model is not None:
        page = f"models/{model}"
    elif run_id:
        page = f"experiments/{experiment_id}/runs/{run_id}"
    else:
        page = f"experiments/{experiment_id}/runs"
        query += f"&viewStateShareKey={RUNS_VIEW_KEY}"
    return f"{base.rstrip('/')}/#/{page}?{query}"


def ensure_experiment(client: Any, name: str, tracking_uri: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(
                name, artifact_location=artifact_location_for(tracking_uri), tags=EXPERIMENT_TAGS
            )
        except MlflowException:  # created meanwhile by a concurrent search
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def flat_params(config: dict[str, Any]) -> dict[str, str]:
    return {str(k): str(v)[:500] for k, v in sorted(config.items())}


def finite_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numeric, finite entries of a Tune result (booleans as 0/1)."""
    out = {}
    for key, value in result.items():
        if isinstance(value, bool):
            out[key] = float(value)
        elif isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)
    return out


def dataset_input(dataset: Any, source: str, context: str) -> Any:
    """The prepared dataset as an MLflow dataset input (name, fingerprint as digest, source
    folder, per-split counts and preprocessing as its profile), so runs show what they read."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    fingerprint = str(getattr(dataset, "fingerprint", "unknown"))
    profile: dict[str, Any] = {"fingerprint": fingerprint}
    splits = getattr(dataset, "splits", None)
    labelled = getattr(dataset, "labelled", None)
    if splits is not None:
        for split in ("train", "val", "test"):
            in_split = splits == split
            profile[f"{split}_records"] = int(in_split.sum())
            if labelled is not None:
                profile[f"{split}_labelled"] = int((in_split & labelled).sum())
    manifest = getattr(dataset, "manifest", {}) or {}
    preprocess = manifest.get("settings", {}).get("preprocess", {})
    schema = {"signals": "float32 (N, leads, T), mV", "leads": list(getattr(dataset, "leads", ())),
              "fs": preprocess.get("fs"), "preprocess": preprocess}  # fmt: skip
    resolved = Path(source).resolve()
    entity = Dataset(
        name=resolved.name or "ecg",
        digest=fingerprint[:16],
        source_type="local",
        source=json.dumps({"uri": str(resolved)}),
        schema=json.dumps(schema, default=str),
        profile=json.dumps(profile),
    )
    return DatasetInput(dataset=entity, tags=[InputTag("mlflow.data.context", context)])


def git_commit() -> str:
    """The checkout's commit (``-dirty`` with uncommitted changes), or ``unknown``."""
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        commit = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return (commit + ("-dirty" if dirty else "")) if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


if __name__ == "__main__":  # the server's watchdog: python -m leadtune.search.tracking PID -- CMD
    sys.exit(_watch(int(sys.argv[1]), sys.argv[3:]))
