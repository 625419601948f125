"""End-to-end searches on the bundled sample: real Ray, real Optuna study on SQLite, real MLflow.

These are the slowest tests of the suite (each search starts Ray); trials use the ``smoke`` space.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from leadtune.cli import main
from leadtune.search.state import STATE_FILE
from leadtune.search.tracking import STATE_TAG, TRIAL_TAG

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
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
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
    for run in children:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2] or (
            run.data.tags[STATE_TAG] == "early_stopped_scheduler" and len(history) == 1
        )
        assert "lr" in run.data.params and "encoder" in run.data.params
    # the reference point of the space was evaluated first
    trials = optuna_trials(tmp_path)
    assert len(trials) == 6
    assert trials[0].params["encoder"] == "cnn" and trials[0].params["d_model"] == 32

    champion = client.get_model_version_by_alias("lead-id", "champion")
    assert outcome["promotion"]["version"] == str(champion.version)
    # one number per fact: the promoted checkpoint's epoch value, the best over every epoch of
    # every trial, is what the registry, the summary and MLflow's parent run record
    best_loss = min(
        m.value for r in children for m in client.get_metric_history(r.info.run_id, "val_loss")
    )
    assert float(champion.tags["leadtune.val_value"]) == pytest.approx(best_loss, abs=1e-9)
    assert outcome["best"]["value"] == pytest.approx(best_loss, abs=1e-9)
    assert parent.data.metrics["search_best_val_loss"] == pytest.approx(best_loss, abs=1e-9)
    state = json.loads(next((tmp_path / "ray").glob(f"smoke/search-*/{STATE_FILE}")).read_text())
    assert state["status"] == "finished" and len(state["trials"]) == 6
    promoted_run = client.get_run(champion.run_id)
    assert "test_lead_accuracy" in promoted_run.data.metrics
    assert 0 <= promoted_run.data.metrics["test_lead_accuracy"] <= 1


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


def test_sigint_then_resume_finishes_without_losing_or_duplicating(tmp_path, cache_dir):
    # Four epochs per trial: after the first checkpoint there is work left for many seconds, so
    # the interrupt cannot arrive after a fast search has already finished.
    proc = _run_cli(search_args(tmp_path, cache_dir, "--no-promote", trials=4, epochs=4))
    # interrupt once at least one trial has reported an epoch
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if list((tmp_path / "ray").glob("smoke/search-*/lead_id_*/checkpoint_*")):
            break
        time.sleep(1)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=180)
    state = json.loads(next((tmp_path / "ray").glob(f"smoke/search-*/{STATE_FILE}")).read_text())
    assert state["status"] != "finished", output
    before = {r.data.tags[TRIAL_TAG]: r for r in child_runs(tmp_path)[2]}
    done_before = {t for t, r in before.items() if r.data.tags[STATE_TAG] == "completed"}

    resumed = _run_cli(
        search_args(tmp_path, cache_dir, "--no-promote", "--resume", trials=4, epochs=4)
    )
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    client, parents, children = child_runs(tmp_path)
    ids = [r.data.tags[TRIAL_TAG] for r in children]
    assert len(parents) == 1
    assert len(ids) == len(set(ids)) == 4, ids  # no duplicated run, none lost
    assert done_before <= set(ids)
    assert all(r.data.tags[STATE_TAG] != "running" for r in children)
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in optuna_trials(tmp_path)) == 4


def test_crashed_trial_is_recorded_and_resume_completes_it(tmp_path, cache_dir):
    marker = tmp_path / "fault-injected"
    env = {"LEADTUNE_INJECT_FAULT": f"1:{marker}"}
    args = search_args(tmp_path, cache_dir, "--no-promote", "--max-failures", "0", trials=3)
    first = _run_cli(args, env=env)
    output, _ = first.communicate(timeout=600)
    assert marker.exists(), output
    _, _, children = child_runs(tmp_path)
    states = sorted(r.data.tags[STATE_TAG] for r in children)
    assert states.count("failed") == 1, states

    resumed = _run_cli([*args, "--resume"], env=env)
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    _, parents, children = child_runs(tmp_path)
    ids = [r.data.tags[TRIAL_TAG] for r in children]
    assert len(parents) == 1 and len(ids) == len(set(ids)) == 3
    assert all(r.data.tags[STATE_TAG] in ("completed", "early_stopped_scheduler") for r in children)
    state = json.loads(next((tmp_path / "ray").glob(f"smoke/search-*/{STATE_FILE}")).read_text())
    assert state["status"] == "finished"


def test_trials_are_placed_on_both_nodes_of_a_two_node_cluster(tmp_path, cache_dir):
    import ray
    from ray.cluster_utils import Cluster

    from leadtune.search.tuner import SearchSettings, run_search
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
        node_ids = {t["node_id"] for t in outcome.trials}
        cluster_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert len(cluster_nodes) == 2
    assert node_ids == cluster_nodes
