"""End-to-end searches on the bundled sample: real Ray, real Optuna study on SQLite, real MLflow.

These are the slowest tests of the suite (each search starts Ray); trials use the ``smoke`` space.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest

from leadtune.cli import main
from leadtune.search.state import read_state
from leadtune.search.tracking import (
    RUNS_VIEW_KEY,
    RUNS_VIEW_TAG,
    STATE_TAG,
    TRIAL_TAG,
    mlflow_client,
    ui_url,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "ptbxl-sample"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def search_args(
    root: Path, cache: Path, *extra: str, trials: int = 6, epochs: int = 2
) -> list[str]:
    return [
        "search", "--space", "smoke", "--trials", str(trials), "--epochs", str(epochs),
        "--max-concurrent", "2", "--tracking-uri", f"sqlite:///{root}/mlflow.db",
        "--storage-path", str(root / "ray"), "--source", str(SAMPLE),
        "--cache-dir", str(cache), *extra,
    ]  # fmt: skip


def child_runs(root: Path, study: str = "smoke"):
    client = mlflow_client(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name(study)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("leadtune.kind") == "search"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def optuna_trials(root: Path, study: str = "smoke"):
    return optuna.load_study(study_name=study, storage=f"sqlite:///{root}/ray/optuna.db").trials


def shutdown_ray():
    import ray

    if ray.is_initialized():
        ray.shutdown()


def test_a_new_database_copied_from_the_schema_template_equals_a_migrated_one(
    tmp_path, monkeypatch
):
    """The fast path for a new mlflow.db (a copy of an empty database this MLflow version
    migrated before) against the plain one (MLflow's migrations): same tables, indexes,
    schema revision and rows, and MLflow writes to the copy."""
    import sqlite3

    from leadtune.search.tracking import schema_template

    monkeypatch.setenv("LEADTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    template = schema_template()
    assert not template.exists()
    mlflow_client(f"sqlite:///{tmp_path}/migrated.db")  # migrates, then keeps the template
    assert template.is_file()
    copy = mlflow_client(f"sqlite:///{tmp_path}/copied.db")

    def contents(db: Path) -> dict:
        with sqlite3.connect(db) as conn:
            tables = [
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            ]
            return {
                "schema": sorted(
                    conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master")
                ),
                "rows": {
                    t: sorted(map(repr, conn.execute(f'SELECT * FROM "{t}"'))) for t in tables
                },
            }

    migrated, copied = contents(tmp_path / "migrated.db"), contents(tmp_path / "copied.db")
    assert copied["schema"] == migrated["schema"]
    default = copy.get_experiment("0")  # made now, here, as a migration here would have
    assert default.artifact_location == str(tmp_path / "mlruns" / "0")
    assert abs(default.creation_time / 1000 - time.time()) < 60
    del copied["rows"]["experiments"], migrated["rows"]["experiments"]
    assert copied["rows"] == migrated["rows"]  # alembic_version, tags, ...
    experiment = copy.create_experiment("written")
    run = copy.create_run(experiment)
    copy.log_metric(run.info.run_id, "x", 1.0)
    assert copy.get_run(run.info.run_id).data.metrics == {"x": 1.0}


def test_smoke_search_logs_every_trial_and_promotes_a_champion(tmp_path, cache_dir, capsys):
    try:
        code = main(search_args(tmp_path, cache_dir, "--json"))
    finally:
        shutdown_ray()
    assert code == 0
    outcome = json.loads(capsys.readouterr().out)
    client, parents, children = child_runs(tmp_path)
    assert len(parents) == 1 and len(children) == 6
    parent = parents[0]
    assert parent.data.tags["leadtune.data_fingerprint"]
    assert "search_best_val_loss" in parent.data.metrics  # not a trial metric's name
    fingerprint = parent.data.tags["leadtune.data_fingerprint"]
    for run in [parent, *children]:  # the data read, as an MLflow dataset with its fingerprint
        (used,) = run.inputs.dataset_inputs
        assert used.dataset.digest == fingerprint[:16] and used.dataset.source_type == "local"
    bookkeeping = {"epoch", "should_checkpoint", "done", "training_iteration"}
    for run in children:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert not bookkeeping & set(run.data.metrics), run.data.metrics.keys()
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2] or (
            run.data.tags[STATE_TAG] == "early_stopped_scheduler" and len(history) == 1
        )
        assert "lr" in run.data.params and "encoder" in run.data.params
        assert run.data.tags["mlflow.source.name"] == "leadtune search"  # MLflow's Source column
    # the reference point of the space was evaluated first
    trials = optuna_trials(tmp_path)
    assert len(trials) == 6
    assert trials[0].params["encoder"] == "cnn" and trials[0].params["d_model"] == 32

    champion = client.get_model_version_by_alias("lead-id", "champion")
    assert outcome["promotion"]["version"] == str(champion.version)
    # the search gain: the champion against the space's reference point (Optuna trial 0)
    gain = outcome["promotion"]["search_gain"]
    reference = next(t for t in outcome["trials"] if t["optuna_trial"] == 0)
    assert gain["reference_trial"] == reference["trial_id"]
    assert "search gain" in champion.description
    if gain.get("test"):
        assert gain["test"]["test"] == "exact McNemar on lead-level correctness"
        assert 0 <= gain["test"]["p_value"] <= 1
        assert gain["test"]["a"] == pytest.approx(
            float(champion.tags["leadtune.test_lead_accuracy_hungarian"])
        )
    # one number per fact: the promoted checkpoint's epoch value, the best over every epoch of
    # every trial, is what the registry, the summary and MLflow's parent run record
    best_loss = min(
        m.value for r in children for m in client.get_metric_history(r.info.run_id, "val_loss")
    )
    assert float(champion.tags["leadtune.val_value"]) == pytest.approx(best_loss, abs=1e-9)
    assert outcome["best"]["value"] == pytest.approx(best_loss, abs=1e-9)
    assert parent.data.metrics["search_best_val_loss"] == pytest.approx(best_loss, abs=1e-9)
    test_acc = float(champion.tags["leadtune.test_lead_accuracy_hungarian"])
    assert champion.description.startswith(f"test lead accuracy (Hungarian) {test_acc:.4f}; ")
    assert f"chosen on val_loss {best_loss:.4f}" in champion.description  # the registry's table
    described = client.get_registered_model("lead-id").description  # the model page's top
    assert described.endswith(f"Champion: v{champion.version}, {champion.description}")
    state = read_state(next((tmp_path / "ray").glob("smoke/search-*")))
    assert state["status"] == "finished" and len(state["trials"]) == 6
    promoted_run = client.get_run(champion.run_id)
    assert "test_lead_accuracy" in promoted_run.data.metrics
    assert 0 <= promoted_run.data.metrics["test_lead_accuracy"] <= 1

    # MLflow's runs table: the link opens a shared view whose columns are the searched metric,
    # the best epochs' figures and the parameters that differ between trials, all of them
    # filled by the runs, sorted best first
    assert f"viewStateShareKey={RUNS_VIEW_KEY}" in ui_url("http://127.0.0.1:5000", "1")
    experiment = client.get_experiment(parent.info.experiment_id)
    view = json.loads(experiment.tags[RUNS_VIEW_TAG])
    columns = view["selectedColumns"]
    assert columns[0] == view["orderByKey"] == "metrics.`best_val_loss`" and view["orderByAsc"]
    assert "metrics.`best_val_lead_accuracy_hungarian`" in columns
    children = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert columns[1:3] == ["tags.`leadtune.state`", "tags.`leadtune.epochs_run`"]
    for column in columns:  # every metric and tag on every run it is for; conditional
        kind, name = column.split(".", 1)  # parameters (depth, heads) where the trial has them
        name = name.strip("`")
        runs = [parent] if name.startswith("search_best_") else children
        found = {"metrics": lambda r: r.data.metrics, "params": lambda r: r.data.params,
                 "tags": lambda r: r.data.tags}[kind]  # fmt: skip
        held = [name in found(r) for r in runs]
        assert (any if kind == "params" else all)(held), column
    for run in children:  # the full training config, not only the searched values
        assert {"lr", "encoder", "epochs", "seed", "jitter_prob", "lr_schedule"} <= set(
            run.data.params
        )
    assert parent.data.params["metric"] == "val_loss" and parent.data.params["scheduler"] == "asha"
    assert Path(parent.data.params["storage_path"]).is_absolute()
    varied = {c[len("params.`") : -1] for c in columns if c.startswith("params.")}
    configs = [t["config"] for t in outcome["trials"]]
    assert {"encoder", "lr"} <= varied
    assert all(len({str(c.get(k)) for c in configs}) > 1 for k in varied)
    rows = {t["trial_id"]: t for t in outcome["trials"]}
    for run in children:  # the same figure as the trial table's, from the same best epoch
        row = rows[run.data.tags[TRIAL_TAG]]
        assert run.data.metrics["best_val_lead_accuracy_hungarian"] == pytest.approx(
            row["val_lead_accuracy_hungarian"], abs=1e-12
        )


def _run_cli(args: list[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "leadtune", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


# Third-party lines a user cannot act on (links to a server that is stopped when the command
# ends, INFO about table creation and registry waits, Ray's temporary folder and its snapshot
# timing hint): none may reach the terminal.
NOISE = (
    "View run", "View experiment", "INFO mlflow", "Creating initial MLflow", "Result logdir",
    "Experiment state snapshotting",
)  # fmt: skip


def assert_quiet(output: str) -> None:
    found = [line for line in output.splitlines() if any(n in line for n in NOISE)]
    assert not found, found


def _wait_for(predicate, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read()
    raise AssertionError("timed out waiting")


def _trials_ended(root: Path) -> dict:
    """The trials the search's state file records as ended ({} before it exists)."""
    try:
        return _state(root).get("trials", {})
    except (StopIteration, FileNotFoundError, ValueError):  # not written yet, or mid-replace
        return {}


def _state(root: Path) -> dict:
    return read_state(next((root / "ray").glob("smoke/search-*")))


def test_stopped_trials_are_pruned_in_optuna_with_every_epoch_as_intermediate_value(
    tmp_path, cache_dir
):
    """Optuna learns how each trial ended: a trial the scheduler stopped is PRUNED (its value
    the last intermediate one), only a trial that ran all its epochs is COMPLETE, and every
    epoch's value is an intermediate value; the study names its metric."""
    try:
        code = main(search_args(tmp_path, cache_dir, "--no-promote", trials=8, epochs=4))
    finally:
        shutdown_ray()
    assert code == 0
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{tmp_path}/ray/optuna.db")
    assert study.metric_names == ["best_val_loss"]
    by_tune = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    ended = read_state(next((tmp_path / "ray").glob("smoke/search-*")))["trials"]
    assert len(ended) == len(by_tune) == 8
    pruned = 0
    for trial_id, record in ended.items():
        trial, epochs = by_tune[trial_id], record["epoch"]
        assert sorted(trial.intermediate_values) == list(range(1, epochs + 1))
        if record["state"] == "early_stopped_scheduler":
            pruned += 1
            assert trial.state == optuna.trial.TrialState.PRUNED and epochs < 4
            assert trial.value == trial.intermediate_values[epochs]
            assert trial.user_attrs["leadtune_end"] == "stopped_early"
        else:
            assert trial.state == optuna.trial.TrialState.COMPLETE and epochs == 4
            assert trial.value == pytest.approx(min(trial.intermediate_values.values()))
    assert pruned >= 1  # ASHA halves 8 trials at a quarter and at half of their 4 epochs


def test_trials_the_time_budget_stops_are_pruned_not_failed(tmp_path, cache_dir):
    """Tune does not tell the searcher of trials its time budget stops; the search does, so
    no trial is left RUNNING or marked FAIL for it."""
    try:
        code = main(search_args(tmp_path, cache_dir, "--no-promote", "--time-budget", "25",
                                trials=8, epochs=6))  # fmt: skip
    finally:
        shutdown_ray()
    trials = optuna_trials(tmp_path)
    # 1: no trial reported within the budget (a busy machine); the states must hold all the same
    assert code in (0, 3) or (code == 1 and all(t.value is None for t in trials)), code
    assert optuna.trial.TrialState.FAIL not in {t.state for t in trials}, trials
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned  # 8 trials of 6 epochs do not fit in 25 s
    for trial in pruned:
        assert trial.user_attrs["leadtune_end"] in ("stopped_early", "stopped_by_budget")
        if trial.intermediate_values:  # its last value; none if it never reported one
            assert trial.value == trial.intermediate_values[max(trial.intermediate_values)]
        else:
            assert trial.value is None
    # and no MLflow run stays RUNNING: a budget-stopped trial's run ends KILLED with its state
    _, _, runs = child_runs(tmp_path)
    assert runs and not [r.info.run_id for r in runs if r.info.status == "RUNNING"], runs
    for run in runs:
        if run.data.tags.get("leadtune.state") == "stopped_by_budget":
            assert run.info.status == "KILLED"
            if "leadtune.epochs_run" in run.data.tags:  # absent when Tune's last result had none
                assert int(run.data.tags["leadtune.epochs_run"]) >= 1


def _registered(root: Path, name: str = "lead-id") -> list:
    client = mlflow_client(f"sqlite:///{root}/mlflow.db")
    try:
        return client.search_model_versions(f"name = '{name}'")
    except Exception:
        return []


def test_early_sigint_promotes_nothing_and_resume_finishes_every_trial_once(tmp_path, cache_dir):
    """Ctrl-C as soon as the first trial has ended, when Tune has just asked Optuna for the
    next trial and not started it (a trial with no result yet, so no config in Tune's results):
    trials that had not finished are not 'completed', none of their Optuna trials is failed, the
    search stays resumable, nothing is registered; --resume ends with four unique child runs,
    four finished Optuna trials and one champion."""
    proc = _run_cli(search_args(tmp_path, cache_dir, trials=4, epochs=4))
    _wait_for(lambda: _trials_ended(tmp_path), proc)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=180)
    first_output = output
    assert proc.returncode == 3, output  # interrupted
    assert "failed Optuna trial" not in output, output  # the waiting trial is still alive
    state = _state(tmp_path)
    assert state["status"] == "interrupted", output
    assert len(state.get("trials", {})) < 4  # the unfinished ones were not recorded as ended
    assert not _registered(tmp_path)  # an interrupted search promotes nothing
    _, _, children = child_runs(tmp_path)
    assert all(r.data.tags[STATE_TAG] != "completed" or r.data.tags[TRIAL_TAG] in
               state.get("trials", {}) for r in children)  # fmt: skip
    assert all(r.info.status != "RUNNING" for r in children)

    resumed = _run_cli(search_args(tmp_path, cache_dir, "--resume", trials=4, epochs=4))
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, f"{first_output}\n--- resumed ---\n{output}"
    assert_quiet(first_output + output)  # a new database, a search, a promotion: no noise
    client, parents, children = child_runs(tmp_path)
    ids = [r.data.tags[TRIAL_TAG] for r in children]
    assert len(parents) == 1
    assert len(ids) == len(set(ids)) == 4, ids  # no duplicated run, none lost
    assert all(r.data.tags[STATE_TAG] in ("completed", "early_stopped_scheduler")
               for r in children)  # fmt: skip
    trials = optuna_trials(tmp_path)
    ended = {t.user_attrs["tune_trial_id"]: t.state for t in trials}  # pruned: ASHA stopped it
    done = {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    assert len(ended) == 4 and set(ended.values()) <= done, trials
    for run in children:
        stopped = run.data.tags[STATE_TAG] == "early_stopped_scheduler"
        pruned = ended[run.data.tags[TRIAL_TAG]] == optuna.trial.TrialState.PRUNED
        assert stopped == pruned, run.data.tags
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    assert len(_registered(tmp_path)) == 1
    assert str(client.get_model_version_by_alias("lead-id", "champion").version) == "1"
    assert _state(tmp_path)["status"] == "finished"


def _mlflow_servers(db: Path) -> list[str]:
    # -ww: whole command lines (ps cuts them at $COLUMNS otherwise, and pytest may set it)
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "mlflow" in line and str(db) in line]


def test_a_killed_driver_leaves_no_server_and_resume_leaves_no_orphaned_optuna_trial(
    tmp_path, cache_dir
):
    args = [a for a in search_args(tmp_path, cache_dir, "--no-promote", trials=3, epochs=3)]
    at = args.index("--tracking-uri")
    del args[at : at + 2]  # the default database under --storage-path ...
    proc = _run_cli([*args, "--mlflow-server"])  # ... through a server the search starts
    db = (tmp_path / "ray" / "mlflow.db").resolve()
    _wait_for(lambda: list((tmp_path / "ray").glob("smoke/search-*/lead_id_*")), proc)
    assert _mlflow_servers(db)
    proc.kill()  # SIGKILL: the driver runs no cleanup at all
    proc.wait()
    deadline = time.monotonic() + 30
    while _mlflow_servers(db) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _mlflow_servers(db)
    shutdown_ray_cluster_of(tmp_path)

    # resumed without the flag: the driver writes the same database itself, and no server runs
    resumed = _run_cli([*args, "--resume"])
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.append(resumed.stdout.read()), daemon=True)
    reader.start()
    servers: list[str] = []
    deadline = time.monotonic() + 600
    while resumed.poll() is None and time.monotonic() < deadline:
        servers += _mlflow_servers(db)
        time.sleep(0.5)
    resumed.wait(timeout=5)
    reader.join(timeout=10)
    output = "".join(chunks)
    assert resumed.returncode == 0, output
    assert not servers, servers
    trials = optuna.load_study(study_name="smoke", storage=f"sqlite:///{tmp_path}/ray/optuna.db")
    states = [t.state for t in trials.trials]
    assert optuna.trial.TrialState.RUNNING not in states, states
    assert _state(tmp_path)["status"] == "finished"
    client = mlflow_client(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    finished = [
        r for r in runs if "mlflow.parentRunId" in r.data.tags and r.info.status == "FINISHED"
    ]
    assert len(finished) >= 3, [(r.info.run_name, r.info.status) for r in runs]


def shutdown_ray_cluster_of(root: Path) -> None:
    """What a killed driver leaves of its local Ray is Ray's own to clean up; give it time."""
    time.sleep(2)


def test_two_searches_at_once_on_one_study_each_register_their_own_trial(tmp_path, cache_dir):
    procs = [
        _run_cli(search_args(tmp_path, cache_dir, "--max-concurrent", "1", trials=2, epochs=1))
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    folders = sorted((tmp_path / "ray" / "smoke").glob("search-*"))
    assert len(folders) == 2  # distinct folders, even when started in the same second
    client, parents, children = child_runs(tmp_path)
    assert len(parents) == 2 and len(children) == 4
    versions = _registered(tmp_path)
    assert len(versions) == 2
    for version in versions:
        parent = version.tags["leadtune.search_run_id"]
        trial_runs = {r.data.tags[TRIAL_TAG] for r in children
                      if r.data.tags["mlflow.parentRunId"] == parent}  # fmt: skip
        assert version.tags["leadtune.trial_id"] in trial_runs


def test_a_two_objective_search_keeps_a_pareto_front_and_promotes_by_the_budget(
    tmp_path, cache_dir
):
    """A second objective (parameters, min): the Optuna study has two named directions and its
    completed trials both values, every objective is in each trial's MLflow run, the Pareto
    front is marked in the state and in MLflow and drawn in the report, and the champion is the
    best val_loss among the trials within ``--within params<=LIMIT`` (the promotion rule)."""
    from leadtune.search.objectives import choose_best, pareto_front

    try:
        code = main(
            search_args(tmp_path, cache_dir, "--no-promote", "--objective", "params:min",
                        "--scheduler", "fifo", trials=5, epochs=2)
        )  # fmt: skip
    finally:
        shutdown_ray()
    assert code == 0
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{tmp_path}/ray/optuna.db")
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    assert study.metric_names == ["best_val_loss", "at_best_params"]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 5 and all(len(t.values) == 2 for t in complete)

    client, _, children = child_runs(tmp_path)
    assert len(children) == 5
    by_trial = {r.data.tags["leadtune.trial_id"]: r for r in children}
    rows = []
    for trial in complete:
        run = by_trial[trial.user_attrs["tune_trial_id"]]
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert len(history) == 2 and run.data.metrics["infer_ms_per_ecg"] > 0
        assert trial.values[0] == pytest.approx(min(m.value for m in history))
        assert trial.values[1] == run.data.metrics["params"] > 0
        rows.append({"trial_id": run.data.tags["leadtune.trial_id"], "value": trial.values[0],
                     "objectives": {"params": trial.values[1]}})  # fmt: skip
    search_dir = next((tmp_path / "ray").glob("smoke/search-*"))
    state = read_state(search_dir)
    front = {r["trial_id"] for r in pareto_front(rows, [("val_loss", "min"), ("params", "min")])}
    assert front and set(state["pareto_trials"]) == front
    assert {t for t, r in by_trial.items() if r.data.tags["leadtune.pareto"] == "true"} == front

    # a budget that the smallest model meets: the champion is the best val_loss within it
    limit = min(r["objectives"]["params"] for r in rows)
    expected = choose_best(rows, "min", [("params", "<=", limit)])
    code = main(["promote", "--study", "smoke", "--storage-path", str(tmp_path / "ray"),
                 "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                 "--within", f"params<={limit:.0f}"])  # fmt: skip
    assert code == 0
    (version,) = _registered(tmp_path)
    assert client.get_run(version.run_id).data.tags["leadtune.trial_id"] == expected["trial_id"]

    out = tmp_path / "report"
    code = main(["report", "--study", "smoke", "--storage-path", str(tmp_path / "ray"),
                 "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--out", str(out)])  # fmt: skip
    assert code == 0
    assert (out / "plots" / "pareto.png").stat().st_size > 10_000
    text = (out / "report.md").read_text()
    assert "Pareto front" in text
    # the champion decision and the test figures, from the parent run promotion tagged
    assert f"registered: [`models:/lead-id/{version.version}`](" in text
    assert f"(trial {expected['trial_id']}, MLflow run" in text
    assert "- champion alias: moved to it" in text and "test_lead_accuracy " in text


def test_a_task_that_is_not_lead_identification_runs_through_search_and_promotion(
    tmp_path, monkeypatch
):
    """The toy task (tests/toy_task.py): a real search, MLflow runs, promotion under its own
    name, and a registered package that loads. Its first trial's loss turns non-finite: that
    trial fails cleanly and the study goes on."""
    import toy_task  # noqa: F401  (registers the task and the space here)

    from leadtune.analysis import load_model
    from leadtune.search.settings import SearchSettings
    from leadtune.search.tuner import run_search
    from leadtune.trainables.tasks import DataRequest

    monkeypatch.setenv("LEADTUNE_TASKS", "toy_task")  # trial workers import it too
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "tests"), *sys.path]))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    try:
        outcome = run_search(
            SearchSettings(
                space="toy", trials=4, max_concurrent=2, max_failures=0, scheduler="fifo",
                storage_path=str(tmp_path / "runs"), tracking_uri=uri,
                data=DataRequest(source=tmp_path, progress=False),
            )
        )  # fmt: skip
    finally:
        shutdown_ray()
    states = sorted(t["state"] for t in outcome.trials)
    assert states == ["completed", "completed", "completed", "failed"], outcome.trials
    assert outcome.status == "finished" and outcome.promotion["registered_model"] == "toy-model"
    client = mlflow_client(uri)
    runs = client.search_runs([outcome.experiment_id], max_results=100)
    failed = [r for r in runs if r.data.tags.get(STATE_TAG) == "failed"]
    assert (
        len(failed) == 1 and "non-finite loss at epoch 2" in failed[0].data.tags["leadtune.error"]
    )
    assert {r.data.tags.get("leadtune.task") for r in runs} == {"toy"}
    loaded = load_model("models:/toy-model@champion", uri)
    assert loaded.task == "toy" and loaded.kind == "registry"
    assert abs(float(loaded.model.weight.detach()) - outcome.best["config"]["slope"]) < 5
    study = optuna.load_study(study_name="toy", storage=f"sqlite:///{tmp_path}/runs/optuna.db")
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE"] * 3 + ["FAIL"]

    # ... and through the delivery commands, which must use the toy task's own parts
    champion = "models:/toy-model@champion"
    common = ["--tracking-uri", uri]
    assert main(["evaluate", champion, *common, "--source", str(tmp_path),
                 "--out", str(tmp_path / "evaluate")]) == 0  # fmt: skip
    evaluation = json.loads((tmp_path / "evaluate" / "evaluation.json").read_text())
    # the task's own evaluation of the registered model: what promotion measured on it
    assert evaluation["task"] == "toy"
    assert evaluation["metrics"]["test_loss"] == pytest.approx(
        outcome.promotion["test_metrics"]["test_loss"], rel=1e-6
    )
    assert "test loss" in (tmp_path / "evaluate" / "evaluation.md").read_text()
    suite = ["--suite", "labelling", "--source", str(tmp_path)]
    assert main(["evaluate", champion, *common, *suite]) == 2  # lead-ID's suite: a clear error
    assert main(["export", champion, *common, "--out", str(tmp_path / "export")]) == 0
    card = json.loads((tmp_path / "export" / "model_card.json").read_text())
    assert card["name"] == "leadtune toy" and card["task"].startswith("fit y = 2x")
    assert card["input"]["shape"] == ["B", 1, 1] and card["verification"]["passed"]
    assert main(["report", "--storage-path", str(tmp_path / "runs"), "--study", "toy",
                 *common]) == 0  # fmt: skip
    report = next((tmp_path / "runs" / "toy").glob("search-*/report/report.md")).read_text()
    assert "models:/toy-model/1" in report and "test_loss" in report and "val_slope" in report
    assert main(["train", "--task", "toy", "--source", str(tmp_path),
                 "--out", str(tmp_path / "train")]) == 0  # fmt: skip


def test_a_crashed_trial_is_retried_from_its_checkpoint_in_the_same_run(tmp_path, cache_dir):
    """A trial worker crashes once after epoch 1: Tune retries it from that checkpoint
    (--max-failures 1), it keeps its one MLflow run, and the search finishes."""
    marker = tmp_path / "fault-injected"
    env = {"LEADTUNE_INJECT_FAULT": f"1:{marker}"}
    args = search_args(tmp_path, cache_dir, "--no-promote", "--scheduler", "fifo", trials=2)
    run = _run_cli(args, env=env)
    output, _ = run.communicate(timeout=600)
    assert run.returncode == 0 and marker.exists(), output
    _, parents, children = child_runs(tmp_path)
    ids = [r.data.tags[TRIAL_TAG] for r in children]
    assert len(parents) == 1 and len(ids) == len(set(ids)) == 2
    assert all(r.data.tags[STATE_TAG] == "completed" for r in children)
    for run_ in children:  # the retried trial continued: epochs 1 and 2 once each
        client = mlflow_client(f"sqlite:///{tmp_path}/mlflow.db")
        steps = [m.step for m in client.get_metric_history(run_.info.run_id, "val_loss")]
        assert sorted(set(steps)) == [1, 2]
    assert _state(tmp_path)["status"] == "finished"


def test_a_trial_that_fails_for_good_ends_the_search_without_it(tmp_path, cache_dir):
    marker = tmp_path / "fault-injected"
    env = {"LEADTUNE_INJECT_FAULT": f"1:{marker}"}
    args = search_args(tmp_path, cache_dir, "--max-failures", "0", "--scheduler", "fifo",
                       trials=2)  # fmt: skip
    run = _run_cli(args, env=env)
    output, _ = run.communicate(timeout=600)
    assert run.returncode == 0, output
    _, _, children = child_runs(tmp_path)
    assert sorted(r.data.tags[STATE_TAG] for r in children) == ["completed", "failed"]
    state = _state(tmp_path)
    assert state["status"] == "finished"
    failed = next(t for t, r in state["trials"].items() if r["state"] == "failed")
    assert _registered(tmp_path)[0].tags["leadtune.trial_id"] != failed


def test_trials_are_placed_on_both_nodes_of_a_two_node_cluster(tmp_path, cache_dir):
    import ray
    from ray.cluster_utils import Cluster

    from leadtune.search.settings import SearchSettings
    from leadtune.search.tuner import run_search
    from leadtune.trainables.tasks import DataRequest

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
        outcome = run_search(
            SearchSettings(
                space="smoke",
                trials=2,
                epochs=1,
                max_concurrent=2,
                cpus_per_trial=1,
                scheduler="fifo",
                address=cluster.address,
                storage_path=str(tmp_path / "ray"),
                tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                promote=False,
                data=DataRequest(source=SAMPLE, cache_dir=str(cache_dir), progress=False),
            )
        )
        assert all(t["state"] == "completed" for t in outcome.trials), outcome.trials
        assert outcome.status == "finished"
        node_ids = {t["node_id"] for t in outcome.trials}
        cluster_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert len(cluster_nodes) == 2
    assert node_ids == cluster_nodes
