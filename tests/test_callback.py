"""The search's MLflow callback (leadtune.search.callback) on a real MLflow database: epochs are
written in batches, none is lost when a trial ends or the search stops, and a resumed search
writes the epochs a killed driver had kept back, once each."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

from leadtune.search.callback import MlflowTrialCallback
from leadtune.search.state import write_state
from leadtune.search.tracking import TRIAL_TAG, mlflow_client


def _callback(tmp_path: Path) -> tuple[MlflowTrialCallback, object]:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow_client(uri)
    experiment = client.create_experiment("cb")
    parent = client.create_run(experiment).info.run_id
    write_state(tmp_path / "search", status="running")
    callback = MlflowTrialCallback(uri, experiment, parent, tmp_path / "search", "lead_id",
                                   "val_loss")  # fmt: skip
    return callback, client


def _trial(tmp_path: Path, trial_id: str = "t1") -> SimpleNamespace:
    path = tmp_path / "search" / f"lead_id_{trial_id}"
    path.mkdir(parents=True, exist_ok=True)
    return SimpleNamespace(trial_id=trial_id, path=str(path), config={"lr": 0.001},
                           last_result={}, error_file=None)  # fmt: skip


def _result(epoch: int) -> dict:
    return {"epoch": epoch, "val_loss": 1.0 / epoch, "train_loss": 2.0 / epoch,
            "timestamp": 1_700_000_000 + epoch, "training_iteration": epoch}  # fmt: skip


def _steps(client, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "val_loss"))


def test_epochs_wait_at_most_flush_s_and_all_are_written_when_the_trial_ends(tmp_path) -> None:
    callback, client = _callback(tmp_path)
    trial = _trial(tmp_path)
    run_id = callback.run_id_for(trial)
    for epoch in (1, 2, 3):
        callback.on_trial_result(0, [], trial, _result(epoch))
    assert _steps(client, run_id) == []  # kept back: less than FLUSH_S old
    callback.FLUSH_S = 0.0  # as when the oldest waited long enough
    callback.on_step_end(0, [])
    assert _steps(client, run_id) == [1, 2, 3]
    callback.FLUSH_S = 3600.0
    callback.on_trial_result(0, [], trial, _result(4))
    trial.last_result = _result(4)
    callback.on_trial_complete(0, [], trial)
    assert _steps(client, run_id) == [1, 2, 3, 4]  # written before the run ended
    assert client.get_run(run_id).info.status == "FINISHED"
    assert client.get_metric_history(run_id, "train_loss")[-1].value == 0.5


def test_the_search_stopping_writes_what_every_run_kept_back(tmp_path) -> None:
    callback, client = _callback(tmp_path)
    callback.FLUSH_S = 3600.0
    trials = [_trial(tmp_path, "a"), _trial(tmp_path, "b")]
    for trial in trials:
        callback.on_trial_result(0, [], trial, _result(1))
    callback.on_experiment_end(trials)
    for trial in trials:
        assert _steps(client, callback.run_id_for(trial)) == [1]


def test_a_resumed_trial_gets_the_epochs_a_killed_driver_kept_back_once_each(tmp_path) -> None:
    callback, client = _callback(tmp_path)
    trial = _trial(tmp_path)
    run_id = callback.run_id_for(trial)
    callback.FLUSH_S = 0.0
    callback.on_trial_result(0, [], trial, _result(1))
    callback.on_step_end(0, [])  # written
    callback.FLUSH_S = 3600.0
    callback.on_trial_result(0, [], trial, _result(2))  # kept back, then the driver dies
    # Tune's JSON logger had every result; epoch 3 was reported twice (rerun after a restore,
    # the last report counts) and the last line was cut short by the kill
    lines = [_result(1), _result(2), _result(3), {**_result(3), "val_loss": 0.25}]
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"epoch": 4, "val_lo'
    (Path(trial.path) / "result.json").write_text(text)

    resumed = pickle.loads(pickle.dumps(callback))  # as Tune restores the callback
    assert resumed.run_id_for(trial) == run_id  # the same run, found by its trial id
    history = client.get_metric_history(run_id, "val_loss")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert {m.step: m.value for m in history}[3] == 0.25
    runs = client.search_runs(
        [client.get_run(run_id).info.experiment_id], f"tags.`{TRIAL_TAG}` = 't1'"
    )
    assert len(runs) == 1
    # found again later in the same process: nothing is written twice
    pickle.loads(pickle.dumps(callback)).run_id_for(trial)
    assert _steps(client, run_id) == [1, 2, 3]


def test_one_optuna_storage_per_database_until_the_file_is_replaced(tmp_path) -> None:
    from leadtune.search.study import optuna_storage

    url = f"sqlite:///{tmp_path}/optuna.db"
    first = optuna_storage(url)
    assert optuna_storage(url) is first
    (tmp_path / "optuna.db").unlink()
    second = optuna_storage(url)
    assert second is not first
    assert optuna_storage(f"sqlite:///{tmp_path}/other.db") is not second


def test_a_search_stopping_on_a_full_storage_path_writes_nothing_more(tmp_path, monkeypatch):
    """Each write would fail on a full disk (a server's after minutes of retries); the epochs
    stay in result.json for the resume."""
    from leadtune.search.faults import MIN_FREE_ENV

    callback, client = _callback(tmp_path)
    callback.FLUSH_S = 3600.0
    trial = _trial(tmp_path)
    callback.on_trial_result(0, [], trial, _result(1))
    monkeypatch.setenv(MIN_FREE_ENV, str(2**40))  # the reserve above any free space: "full"
    callback.on_experiment_end([trial])
    assert _steps(client, callback.run_id_for(trial)) == []
    monkeypatch.delenv(MIN_FREE_ENV)
    callback.on_experiment_end([trial])
    assert _steps(client, callback.run_id_for(trial)) == [1]
