"""The Tune callback that writes a search into MLflow (one child run per trial, under the
search's parent run) and records each trial's end in the search's state file."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from leadtune.search.faults import (
    StorageGuard,
    armed,
    crash_point,
    is_disk_full,
    text_says_disk_full,
)
from leadtune.search.tracking import (
    OPTUNA_TAG,
    STATE_TAG,
    TASK_TAG,
    TRACKING_URI_ENV,
    TRIAL_TAG,
    finite_metrics,
    flat_params,
    mlflow_client,
)


def trial_state(trial: Any, last: dict[str, Any]) -> str:
    """How a trial that Tune completed ended: on its own, or stopped early. Read from how far
    through its own schedule it got (``schedule_pct``, reported with every epoch), as Optuna is
    told (``search.searcher``); the config's ``epochs`` is only there when a space fixes it (the
    diagnosis space leaves it to the task's default, and its ASHA-stopped trials were once
    called completed here while Optuna had them PRUNED)."""
    from leadtune.search.searcher import PROGRESS_KEY

    if last.get("early_stopped"):
        return "early_stopped_patience"
    progress = last.get(PROGRESS_KEY)
    if progress is not None:
        return "completed" if float(progress) >= 100.0 - 1e-9 else "early_stopped_scheduler"
    planned = int(trial.config.get("epochs", 0) or 0)
    if planned and int(last.get("epoch", planned)) < planned:
        return "early_stopped_scheduler"
    return "completed"


class MlflowTrialCallback(Callback):
    """One MLflow child run per Tune trial, under the search's parent run, and the record of
    each trial's end in the search's state file.

    A trial's run is found again by its trial id, so a resumed search continues the same run
    instead of adding a duplicate. Metrics are logged per epoch with ``step = epoch``, a run's
    epochs in one write at most every :attr:`FLUSH_S` seconds and when its trial ends or the
    search stops (one MLflow write costs the driver ~14 ms of CPU, about as much for five
    epochs as for one). A driver killed outright loses at most those seconds' epochs from
    MLflow, and a resumed search writes them from the trial's ``result.json``.
    """

    # the longest an epoch's metrics wait before they are in MLflow
    FLUSH_S = 10.0

    # Tune's and leadtune's bookkeeping: tags or nothing, not metric series.
    SKIP = {"timestamp", "time_this_iter_s", "time_total_s", "pid", "iterations_since_restore",
            "time_since_restore", "timesteps_total", "episodes_total", "timesteps_since_restore",
            "training_iteration", "done", "epoch", "should_checkpoint", "early_stopped",
            "trial_node_id", "checkpoint_dir_name", "schedule_pct"}  # fmt: skip

    def __init__(
        self,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str,
        search_dir: Path,
        task: str,
        metric: str,
        dataset_input: Any = None,
    ) -> None:
        self._tracking_uri = tracking_uri
        self.dataset_input = dataset_input  # the data every trial reads, on each child run
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.search_dir = Path(search_dir)
        self.task = task
        self.metric = metric
        self._runs: dict[str, str] = {}
        self._client: Any = None
        self._guard: StorageGuard | None = None
        self._ended_at: float | None = None
        # run id -> (when its oldest unwritten epoch arrived, its unwritten metrics)
        self._pending: dict[str, tuple[float, list[Any]]] = {}

    @property
    def tracking_uri(self) -> str:
        # A resumed search may talk to a freshly started server on another port: the driver
        # names the current one in the environment, the pickled callback keeps the old one.
        return os.environ.get(TRACKING_URI_ENV, self._tracking_uri)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None, "_runs": {}, "_guard": None, "_ended_at": None,
                "_pending": {}, "_kept_at": 0.0, "_passed_over": None,
                "_keep_memo": {}}  # fmt: skip

    @property
    def guard(self) -> StorageGuard:
        if getattr(self, "_guard", None) is None:  # (absent in a pickle of an older search)
            self._guard = StorageGuard(self.search_dir)
        return self._guard

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = mlflow_client(self.tracking_uri)
        return self._client

    def run_id_for(self, trial: Any) -> str:
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        from leadtune.search.study import OPTUNA_TRIAL_KEY

        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{TRIAL_TAG}` = '{trial.trial_id}' "
            f"and tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
            max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            self._write_missing_epochs(run_id, trial)
        else:
            number = trial.config.get(OPTUNA_TRIAL_KEY)
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"trial {number} ({trial.trial_id})" if number is not None else None,
                tags={
                    "mlflow.parentRunId": self.parent_run_id,
                    TRIAL_TAG: trial.trial_id,
                    TASK_TAG: self.task,
                    STATE_TAG: "running",
                    OPTUNA_TAG: str(number),
                    "leadtune.trial_dir": str(self.search_dir / Path(trial.path).name),
                    **self._source_tags(),
                },
            )
            run_id = run.info.run_id
            self.client.log_batch(run_id, params=_params(self._full_config(trial.config)))
            if self.dataset_input is not None:
                self.client.log_inputs(run_id, datasets=[self.dataset_input])
        self._runs[trial.trial_id] = run_id
        return run_id

    def _full_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """Every training setting the trial runs with: the searched and fixed values and the
        task's defaults for the rest (MLflow params are written once, so all of them now)."""
        from leadtune.search.study import training_config
        from leadtune.trainables.tasks import get_task

        given = training_config(config)
        try:
            return {**get_task(self.task).config_from_dict(given).to_dict(), **given}
        except (ValueError, KeyError, TypeError):  # the trial itself will say what is wrong
            return given

    def _source_tags(self) -> dict[str, str]:
        """What MLflow's Source column shows, as on the parent run: the command and commit."""
        from leadtune.search.tracking import git_commit

        if getattr(self, "_source", None) is None:
            self._source = {"mlflow.source.name": "leadtune search", "mlflow.source.type": "LOCAL",
                            "mlflow.source.git.commit": git_commit()}  # fmt: skip
        return self._source

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        # a full storage path ends the search now, before a trial fails on it (search.faults)
        self.guard.check()

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        self.flush(older_than=self.FLUSH_S)
        staged = _staging_folder(trials)
        if staged is None:
            return
        ended = getattr(self, "_ended_at", None)
        if armed("tune_checkpoint") and ended is not None:
            self._crash_when_saved(staged, ended)
        self._keep_whole_save(staged)

    def _keep_whole_save(self, staged: Path, ending: bool = False) -> None:
        """Keep Tune's last save that arrived whole in the search's folder (search.tune_state):
        a resume after a kill that tore Tune's copy of its state starts from it."""
        from leadtune.search.tune_state import keep_whole_save

        try:
            kept = keep_whole_save(staged, self.search_dir, self.__dict__.get("_kept_at", 0.0),
                                   self.__dict__.setdefault("_keep_memo", {}))  # fmt: skip
        except OSError as error:
            if is_disk_full(error) and not ending:  # the search stops as interrupted, as on any
                # full disk (at its end it is stopping anyway: its state file says how)
                raise self.guard.full_error("keeping Tune's saved state") from error
            if not self.__dict__.get("_keep_warned") and not is_disk_full(error):
                print(f"[leadtune] warning: Tune's saved state not kept: {error}", file=sys.stderr,
                      flush=True)  # fmt: skip
                self._keep_warned = True
            return
        if kept is not None:
            self._kept_at = kept

    def _crash_when_saved(self, staged: Path, ended: float, wait_s: float = 10.0) -> None:
        """The ``tune_checkpoint`` crash point: in the step whose save of Tune's experiment state
        follows a trial's end, once that save is in the storage path. Tune writes the state to a
        local staging folder during its step and copies it to the storage path in a thread, so
        the storage path alone can show a save a step late, after the searcher has asked Optuna
        for a trial that the saved state does not hold (a resume then fails that trial as
        orphaned). A save whose copy does not arrive (one was still running) is passed over."""
        from leadtune.search.tune_state import newest_save, whole_copy

        newest = newest_save(staged)
        if newest <= ended or newest == self.__dict__.get("_passed_over"):
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if whole_copy(staged, self.search_dir) is not None:
                crash_point("tune_checkpoint")
                return
            time.sleep(0.05)
        self._passed_over = newest

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info):
        crash_point("trial_checkpoint")

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info) -> None:
        self.client.set_tag(self.run_id_for(trial), STATE_TAG, "running")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info):
        from mlflow.entities import Metric

        run_id = self.run_id_for(trial)
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in sorted(self._values(result).items())]
        since, pending = self.pending.get(run_id, (time.monotonic(), []))
        self.pending[run_id] = (since, pending + metrics)  # written by on_step_end's flush
        if armed("trial_last_report"):
            from leadtune.search.searcher import ran_full_budget

            if ran_full_budget(result):
                crash_point("trial_last_report")

    def _values(self, result: dict[str, Any]) -> dict[str, float]:
        return {k: v for k, v in finite_metrics(result).items() if k not in self.SKIP}

    @property
    def pending(self) -> dict[str, tuple[float, list[Any]]]:
        if getattr(self, "_pending", None) is None:  # (absent in a pickle of an older search)
            self._pending = {}
        return self._pending

    def flush(self, older_than: float = 0.0, run_id: str | None = None) -> None:
        """Write the metrics waiting for MLflow: a run's, or every run's whose oldest waited
        ``older_than`` seconds or more."""
        now = time.monotonic()
        for run in [run_id] if run_id is not None else list(self.pending):
            since, metrics = self.pending.get(run, (now, []))
            if not metrics or now - since < older_than:
                continue
            while metrics:  # MLflow takes 1,000 metrics per write; a failed write is kept
                self.client.log_batch(run, metrics=metrics[:1000])
                metrics = metrics[1000:]
                self.pending[run] = (since, metrics)
            self.pending.pop(run, None)

    def _write_missing_epochs(self, run_id: str, trial: Any) -> None:
        """A resumed trial's run gets the epochs its ``result.json`` holds and MLflow does not
        (those a killed driver had not written yet)."""
        from mlflow.entities import Metric

        logged = {m.step for m in self.client.get_metric_history(run_id, self.metric)}
        latest: dict[int, dict[str, Any]] = {}
        for result in _results(self.search_dir / Path(trial.path).name / "result.json"):
            step = int(result.get("epoch", result.get("training_iteration", 0)))
            if step not in logged and self.metric in self._values(result):
                latest[step] = result  # a rerun epoch's last report counts
        metrics = [
            Metric(k, v, int(float(result.get("timestamp", 0)) * 1000), step)
            for step, result in sorted(latest.items())
            for k, v in sorted(self._values(result).items())
        ]
        if metrics:
            self.pending[run_id] = (time.monotonic(), metrics)
            self.flush(run_id=run_id)

    def on_experiment_end(self, trials: list, **info) -> None:
        staged = _staging_folder(trials)
        if self.write_kept_back() and staged is not None:
            self._keep_whole_save(staged, ending=True)  # Tune's last save, copied before this

    def write_kept_back(self) -> bool:
        """Write every run's waiting epochs, unless the storage path is full: each write would
        fail there (a server's after minutes of retries), and a resume writes them from the
        trials' ``result.json``. Returns whether there was room to write."""
        from leadtune.search.faults import StorageFull

        try:
            self.guard.check(force=True)
        except StorageFull:
            return False
        self.flush()
        return True

    def _finish(self, trial: Any, state: str, status: str) -> None:
        from leadtune.search.state import record_trial_end

        self.flush(run_id=self.run_id_for(trial))
        last = trial.last_result or {}
        record_trial_end(
            self.search_dir,
            trial.trial_id,
            state,
            epoch=last.get("epoch"),
            objective=last.get(f"best_{self.metric}"),
        )
        self._ended_at = time.time()
        crash_point("trial_end_recorded")
        end_run(self.client, self.run_id_for(trial), state, last.get("epoch"), status)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info) -> None:
        self._finish(trial, trial_state(trial, trial.last_result or {}), "FINISHED")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info) -> None:
        self._stop_if_disk_full(trial)  # a retry would only fail on it again

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info) -> None:
        # a trial that failed on a full disk did not fail: the search stops, and a resume on a
        # freed path runs it again (the searcher did not fail its Optuna trial either)
        self._stop_if_disk_full(trial)
        self._finish(trial, "failed", "FAILED")
        message = _error_lines(trial)
        if message:
            self.client.set_tag(self.run_id_for(trial), "leadtune.error", message[-1][:500])

    def _stop_if_disk_full(self, trial: Any) -> None:
        if any(text_says_disk_full(line) for line in _error_lines(trial)):
            raise self.guard.full_error(f"trial {trial.trial_id} could not write there")
        self.guard.check(force=True)


def _error_lines(trial: Any) -> list[str]:
    """The errors of a trial as Tune keeps them (its error file)."""
    error = getattr(trial, "error_file", None)
    try:
        return Path(error).read_text().strip().splitlines() if error else []
    except OSError:
        return []


def _staging_folder(trials: list) -> Path | None:
    """The local folder Tune saves the search's state into before copying it to storage."""
    storage = getattr(trials[0], "storage", None) if trials else None
    return None if storage is None else Path(storage.experiment_driver_staging_path)


def _results(path: Path) -> list[dict[str, Any]]:
    """The results Tune's JSON logger wrote for a trial, one per line (a line cut short by a
    killed driver is skipped)."""
    import json

    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    results = []
    for line in lines:
        try:
            result = json.loads(line)
        except ValueError:
            continue
        if isinstance(result, dict):
            results.append(result)
    return results


def _params(config: dict[str, Any]) -> list:
    from mlflow.entities import Param

    return [Param(k, v) for k, v in flat_params(config).items()]


def end_run(client: Any, run_id: str, state: str, epochs: Any, status: str) -> None:
    """End a trial's MLflow run: how it ended (``leadtune.state``), its epochs run where known,
    and MLflow's status (FINISHED, FAILED, KILLED)."""
    tags = {STATE_TAG: state}
    if epochs is not None:
        tags["leadtune.epochs_run"] = str(epochs)
    client.log_batch(run_id, tags=_tags(tags))
    client.set_terminated(run_id, status=status)


def _tags(tags: dict[str, str]) -> list:
    from mlflow.entities import RunTag

    return [RunTag(k, v) for k, v in tags.items()]


class TrialPidCallback(Callback):
    """Tells the search's CPU account (``search.cpu``) which Ray workers ran trials."""

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info):
        from leadtune.search.cpu import note_trial_pid

        if result.get("pid"):
            note_trial_pid(result["pid"])
