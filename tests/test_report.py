"""`leadtune report` on a small real search: Optuna study + MLflow parent/child runs on SQLite.

The search is run here without Ray (four tiny trials trained for real with ``train_lead_id``,
sampled by Optuna's ask/tell) but stored exactly the way ``leadtune search`` stores one: an MLflow
experiment per study, a parent run tagged ``leadtune.kind=search``, child runs tagged
``leadtune.trial_id``/``leadtune.state`` with per-epoch metrics (step = epoch) and params, the
Optuna study in SQLite, and a 0.1-style ``leadtune_search.json`` (read as before) in a ``search-YYYYmmdd-HHMMSS`` folder.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
import wfdb
from delivery_fixtures import SAMPLE

from leadtune.cli import main
from leadtune.trainables.lead_id.train import LeadIdData, train_lead_id
from leadtune.trainables.training import LocalReporter

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tiny_data() -> LeadIdData:
    """18 real ECGs from the bundled sample, cropped to 1.28 s: a trial takes about a second."""
    headers = sorted((SAMPLE / "records100").rglob("*_lr.hea"))[:18]
    signals = np.stack([wfdb.rdsamp(str(h.with_suffix("")))[0].T for h in headers])
    signals = signals[:, :, :128].astype(np.float32)
    return LeadIdData(train=signals[:12], val=signals[12:], fs=100, fingerprint="tiny")


def run_small_search(root: Path, study_name: str, trials: int) -> dict:
    import optuna
    from mlflow.entities import Metric, Param

    from leadtune.search.tracking import mlflow_client

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = root / "ray"
    search_dir = storage / study_name / "search-20250101-120000"
    search_dir.mkdir(parents=True)
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    optuna_storage = f"sqlite:///{storage / 'optuna.db'}"
    client = mlflow_client(tracking_uri)
    experiment_id = client.create_experiment(
        study_name, artifact_location=(root / "mlartifacts").as_uri()
    )
    parent = client.create_run(
        experiment_id,
        tags={
            "leadtune.kind": "search",
            "leadtune.study": study_name,
            "leadtune.optuna_storage": optuna_storage,
            "leadtune.experiment_path": str(search_dir),
        },
    ).info.run_id
    study = optuna.create_study(
        study_name=study_name,
        storage=optuna_storage,
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=0),
    )
    data = _tiny_data()
    histories = {}
    for i in range(trials):
        trial = study.ask()
        config = {
            "encoder": "cnn",
            "context": trial.suggest_categorical("context", ["none", "sab"]),
            "d_model": trial.suggest_categorical("d_model", [8, 16]),
            "lr": trial.suggest_float("lr", 1e-3, 1e-2, log=True),
            "depth": 1,
            "heads": 2,
            "batch_size": 6,
            "epochs": 2,
            "seed": i,
        }
        trial_id = f"lead_id_{i:04d}"
        run_id = client.create_run(
            experiment_id,
            run_name=trial_id,
            tags={
                "mlflow.parentRunId": parent,
                "leadtune.trial_id": trial_id,
                "leadtune.state": "running",
            },
        ).info.run_id
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in config.items()])

        def log(metrics, run_id=run_id):
            now = int(time.time() * 1000)
            client.log_batch(
                run_id,
                metrics=[
                    Metric(k, float(v), now, int(metrics["epoch"]))
                    for k, v in metrics.items()
                    if isinstance(v, float)
                ],
            )

        reporter = LocalReporter(root / trial_id, on_report=log)
        train_lead_id(config, data, reporter=reporter)
        histories[trial_id] = reporter.history
        study.tell(trial, min(m["val_loss"] for m in reporter.history))
        client.set_tag(run_id, "leadtune.state", "completed")
        client.set_terminated(run_id)
    client.set_terminated(parent)
    state = {
        "status": "finished",
        "study": study_name,
        "space": "mini",
        "metric": "val_loss",
        "mode": "min",
        "parent_run_id": parent,
        "experiment_id": experiment_id,
        "tracking_uri_given": tracking_uri,
        "optuna_storage": optuna_storage,
        "data_source": str(SAMPLE),
        "data_limit": None,
        "data_fingerprint": "tiny",
    }
    (search_dir / "leadtune_search.json").write_text(json.dumps(state))
    return {"root": root, "storage": storage, "search_dir": search_dir, "state": state,
            "histories": histories, "tracking_uri": tracking_uri}  # fmt: skip


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    return run_small_search(tmp_path_factory.mktemp("search"), "mini", trials=4)


@pytest.fixture(scope="module")
def markdown_report(search):
    code = main(["report", "--storage-path", str(search["storage"])])  # the only study: found
    assert code == 0
    return search["search_dir"] / "report"


def test_trials_table_and_best_trial_match_the_training_histories(search, markdown_report):
    histories = search["histories"]
    best_values = {t: min(m["val_loss"] for m in h) for t, h in histories.items()}
    best_trial = min(best_values, key=best_values.get)
    summary = json.loads((markdown_report / "report.json").read_text())
    assert summary["best_trial"] == best_trial
    assert summary["best_value"] == pytest.approx(best_values[best_trial])
    with open(markdown_report / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["trial"] for r in rows) == sorted(histories)
    for row in rows:  # every figure of a row is the trial's best epoch's (the promoted one)
        history = histories[row["trial"]]
        best = min(history, key=lambda m: m["val_loss"])
        assert float(row["val_loss"]) == pytest.approx(best_values[row["trial"]], abs=1e-4)
        assert int(row["best epoch"]) == best["epoch"]
        assert float(row["val_lead_accuracy_hungarian"]) == pytest.approx(
            best["val_lead_accuracy_hungarian"], abs=1e-4
        )
        assert row["state"] == "completed" and row["epochs"] == "2"
    for trial in summary["trials"]:
        curve = [v for _, v in trial["curves"]["val_loss"]]
        assert curve == pytest.approx([m["val_loss"] for m in histories[trial["trial_id"]]])
    text = (markdown_report / "report.md").read_text()
    assert f"Trial **{best_trial}**" in text
    for trial_id in histories:
        assert trial_id in text


def test_plots_importances_and_mlflow_attachment(search, markdown_report):
    import optuna

    from leadtune.search.tracking import mlflow_client

    for name in ("history", "parallel", "learning_curves", "importances"):
        data = (markdown_report / "plots" / f"{name}.png").read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    summary = json.loads((markdown_report / "report.json").read_text())
    study = optuna.load_study(study_name="mini", storage=search["state"]["optuna_storage"])
    # ASHA's view, drawn by Optuna, exactly when the study holds intermediate values
    has_intermediate = any(t.intermediate_values for t in study.trials)
    assert ("intermediate" in summary["plots"]) == has_intermediate
    # the best trial links its MLflow run in the UI (the address `mlflow ui` serves)
    best = summary["best_trial"]
    run_id = next(t["run_id"] for t in summary["trials"] if t["trial_id"] == best)
    page = (markdown_report / "report.md").read_text()
    assert f"#/experiments/{search['state']['experiment_id']}/runs/{run_id}" in page
    varied = {k for t in study.trials for k in t.params}
    assert set(summary["importances"]) <= varied and summary["importances"]
    assert sum(summary["importances"].values()) == pytest.approx(1.0, abs=1e-6)
    assert "rough hint" in summary["importance_note"]  # only 4 trials
    client = mlflow_client(search["tracking_uri"])
    attached = {a.path for a in client.list_artifacts(search["state"]["parent_run_id"], "report")}
    assert {"report/report.md", "report/trials.csv", "report/plots"} <= attached


def test_html_report_to_another_folder(search, tmp_path):
    out = tmp_path / "html"
    assert main(["report", "--study", "mini", "--storage-path", str(search["storage"]), "--format", "html",
                 "--out", str(out), "--no-mlflow"]) == 0  # fmt: skip
    page = (out / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "<table>" in page
    assert "src='data:image/png;base64," in page and (out / "plots" / "history.png").is_file()


def test_a_single_trial_gets_a_note_instead_of_importances(tmp_path, capsys):
    small = run_small_search(tmp_path, "one", trials=1)
    assert (
        main(["report", "--study", "one", "--storage-path", str(small["storage"]), "--no-mlflow"])
        == 0
    )
    report = small["search_dir"] / "report"
    assert "at least 2 finished trials" in (report / "report.md").read_text()
    assert not (report / "plots" / "importances.png").exists()
    assert (report / "plots" / "learning_curves.png").is_file()


def test_unknown_study_is_a_one_line_error(search, capsys):
    assert main(["report", "--study", "nosuch", "--storage-path", str(search["storage"])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("leadtune: error:") and "nosuch" in err and "\n" not in err
