"""MLflow for searches: a local tracking server when none is given, one parent run per search,
one child run per trial (kept across resumes), and the Tune callback that writes them.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune import Callback

TRIAL_TAG = "leadtune.trial_id"
STATE_TAG = "leadtune.state"
SEARCH_TAG = "leadtune.search_dir"
TRACKING_URI_ENV = "LEADTUNE_MLFLOW_TRACKING_URI"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class MlflowServer:
    """An ``mlflow server`` on 127.0.0.1 backed by SQLite, started and stopped by leadtune."""

    db_path: Path
    artifacts: Path
    port: int = 0
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 90.0) -> MlflowServer:
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.port = self.port or _free_port()
        self.log_path = self.db_path.parent / "mlflow-server.log"
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.db_path.resolve()}",
            # Artifacts as plain file URIs (not proxied through the server), so the registered
            # model still loads through the SQLite database after this server has stopped.
            "--default-artifact-root", self.artifacts.resolve().as_uri(), "--no-serve-artifacts",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        log = open(self.log_path, "ab")  # noqa: SIM115 (closed with the process)
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
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
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(
            f"mlflow server did not answer within {timeout_s:.0f} s; see {self.log_path}"
        )

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None


def artifact_location_for(tracking_uri: str) -> str | None:
    """Where a new experiment keeps artifacts when the tracking URI is a database file.

    A server decides for itself (None); for ``sqlite:///x/mlflow.db`` it is ``x/mlartifacts``,
    so artifacts never land in whatever folder the command was started from.
    """
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()
    return None


def ensure_experiment(client: Any, name: str, tracking_uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location_for(tracking_uri))


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


class MlflowTrialCallback(Callback):
    """One MLflow child run per Tune trial, under the search's parent run.

    A trial's run is found again by its trial id, so a resumed search continues the same run
    instead of adding a duplicate. Metrics are logged per epoch with ``step = epoch``.
    """

    # Tune's own bookkeeping, not worth a metric series each.
    SKIP = {"timestamp", "time_this_iter_s", "time_total_s", "pid", "iterations_since_restore",
            "time_since_restore", "timesteps_total", "episodes_total", "timesteps_since_restore",
            "training_iteration", "done"}  # fmt: skip

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, metric: str):
        self._tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.metric = metric
        self._runs: dict[str, str] = {}
        self._client: Any = None

    @property
    def tracking_uri(self) -> str:
        # A resumed search may talk to a freshly started server on another port: the driver
        # names the current one in the environment, the pickled callback keeps the old one.
        return os.environ.get(TRACKING_URI_ENV, self._tracking_uri)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def run_id_for(self, trial: Any) -> str:
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{TRIAL_TAG}` = '{trial.trial_id}' "
            f"and tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
            max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(
                self.experiment_id,
                run_name=trial.trial_id if not getattr(trial, "trial_name", None) else str(trial),
                tags={
                    "mlflow.parentRunId": self.parent_run_id,
                    TRIAL_TAG: trial.trial_id,
                    STATE_TAG: "running",
                    "leadtune.trial_dir": str(getattr(trial, "local_path", "") or ""),
                },
            )
            run_id = run.info.run_id
            config = {k: v for k, v in trial.config.items()}
            self.client.log_batch(run_id, params=_params(config))
        self._runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info) -> None:
        self.client.set_tag(self.run_id_for(trial), STATE_TAG, "running")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info):
        from mlflow.entities import Metric

        run_id = self.run_id_for(trial)
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        now = int(time.time() * 1000)
        values = {k: v for k, v in finite_metrics(result).items() if k not in self.SKIP}
        self.client.log_batch(
            run_id, metrics=[Metric(k, v, now, step) for k, v in sorted(values.items())]
        )

    def _finish(self, trial: Any, state: str, status: str) -> None:
        run_id = self.run_id_for(trial)
        tags = {STATE_TAG: state}
        checkpoint = getattr(trial, "checkpoint", None)
        if checkpoint is not None:
            tags["leadtune.checkpoint"] = str(checkpoint.path)
        if getattr(trial, "local_path", None):
            tags["leadtune.trial_dir"] = str(trial.local_path)
        self.client.log_batch(run_id, tags=_tags(tags))
        self.client.set_terminated(run_id, status=status)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info) -> None:
        last = trial.last_result or {}
        planned = int(trial.config.get("epochs", 0) or 0)
        if last.get("early_stopped"):
            state = "early_stopped_patience"
        elif planned and int(last.get("epoch", planned)) < planned:
            state = "early_stopped_scheduler"
        else:
            state = "completed"
        self._finish(trial, state, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info) -> None:
        self._finish(trial, "failed", "FAILED")


def _params(config: dict[str, Any]) -> list:
    from mlflow.entities import Param

    return [Param(k, v) for k, v in flat_params(config).items()]


def _tags(tags: dict[str, str]) -> list:
    from mlflow.entities import RunTag

    return [RunTag(k, v) for k, v in tags.items()]


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            timeout=5,
        )
        commit = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return (commit + ("-dirty" if dirty else "")) if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
