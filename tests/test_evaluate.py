"""`leadtune evaluate` on a registered model: every saved number recomputed independently."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from delivery_fixtures import SAMPLE, delivery_env
from scipy.optimize import linear_sum_assignment
from scipy.stats import chi2

from leadtune.cli import main
from leadtune.trainables.lead_id.train import predict_log_probs
from leadtune.trainables.tasks import load_trained_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return delivery_env(tmp_path_factory)


@pytest.fixture(scope="module")
def evaluated(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate")
    code = main(
        [
            "evaluate", "models:/lead-id@champion", "--tracking-uri", env.tracking_uri,
            "--source", str(SAMPLE), "--cache-dir", str(env.cache_dir), "--out", str(out),
            "--n-boot", "1000", "--compare", str(env.first_checkpoint),
        ]
    )  # fmt: skip
    assert code == 0
    return out, json.loads((out / "evaluation.json").read_text()), np.load(out / "predictions.npz")


def _wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def test_predictions_are_the_checkpoints_on_the_test_split_in_fixed_order(env, evaluated):
    _, result, saved = evaluated
    rows = env.dataset.indices("test")
    assert saved["ecg_ids"].tolist() == env.dataset.ecg_ids[rows].tolist()
    model, config, _ = load_trained_model(env.checkpoint)
    assert tuple(config.leads) == tuple(env.dataset.leads)  # so the identity order is LEADS
    direct = predict_log_probs(
        model, np.ascontiguousarray(env.dataset.signals[rows]), torch.device("cpu")
    )
    np.testing.assert_allclose(saved["log_probs"], direct, atol=1e-5)
    assert "identity" in result["lead_order"]
    assert result["permutation_check"]["max_abs_diff_log_prob"] < 1e-4
    assert result["data"]["n_ecgs"] == len(rows) == 66


def test_accuracies_and_intervals_recompute(evaluated):
    _, result, saved = evaluated
    log_probs, true = saved["log_probs"].astype(np.float64), saved["true"]
    n, k, _ = log_probs.shape
    argmax = log_probs.argmax(axis=-1)
    hungarian = np.stack([linear_sum_assignment(-lp)[1] for lp in log_probs])
    assert (saved["pred_hungarian"] == hungarian).all()
    for method, pred in (("argmax", argmax), ("hungarian", hungarian)):
        stats = result["statistics"][method]
        correct = pred == true
        assert stats["lead_accuracy"] == pytest.approx(correct.mean())
        assert stats["leads_correct"] == correct.sum() and stats["leads_present"] == n * k
        sets = int(correct.all(axis=1).sum())
        assert stats["set_accuracy"] == pytest.approx(sets / n)
        assert stats["set_accuracy_ci"] == pytest.approx(_wilson(sets, n), abs=1e-12)
        # ECG-level bootstrap, redone with another seed: same interval up to resampling noise
        rng = np.random.default_rng(12345)
        draws = rng.integers(0, n, size=(2000, n))
        boot = correct.sum(axis=1)[draws].sum(axis=1) / (n * k)
        lower, upper = stats["lead_accuracy_ci"]
        assert lower <= stats["lead_accuracy"] <= upper
        assert lower == pytest.approx(np.percentile(boot, 2.5), abs=0.015)
        assert upper == pytest.approx(np.percentile(boot, 97.5), abs=0.015)
    # the model is barely trained: argmax must sometimes reuse a label, so the methods differ
    assert (argmax != hungarian).any()


def test_table1_per_superclass_counts_and_wilson_intervals(evaluated):
    _, result, saved = evaluated
    records = pd.read_csv(SAMPLE / "ptbxl_database.csv", index_col="ecg_id")
    statements = pd.read_csv(SAMPLE / "scp_statements.csv", index_col=0)
    diagnostic = statements[statements["diagnostic"] == 1]["diagnostic_class"].to_dict()
    codes = records.loc[saved["ecg_ids"], "scp_codes"].map(eval)
    has_mi = np.array([any(diagnostic.get(c) == "MI" for c in row) for row in codes])
    table = result["table1"]["hungarian"]
    assert table["columns"] == ["overall", "NORM", "MI", "STTC", "CD", "HYP"]
    assert table["n_ecgs"]["overall"] == 66 and table["n_ecgs"]["MI"] == has_mi.sum() == 8
    pred, leads = saved["pred_hungarian"], list(saved["leads"])
    for k, lead in enumerate(leads):
        cell = table["rows"][lead]["MI"]
        hits = int((pred[has_mi, k] == k).sum())
        assert (cell["correct"], cell["total"]) == (hits, int(has_mi.sum()))
        assert cell["ci"] == pytest.approx(_wilson(hits, int(has_mi.sum())), abs=1e-12)
        overall = table["rows"][lead]["overall"]
        assert overall["correct"] == int((pred[:, k] == k).sum()) and overall["total"] == 66


def test_mcnemar_against_the_epoch_one_model(env, evaluated):
    _, result, saved = evaluated
    other, _, _ = load_trained_model(env.first_checkpoint)
    rows = env.dataset.indices("test")
    other_lp = predict_log_probs(
        other, np.ascontiguousarray(env.dataset.signals[rows]), torch.device("cpu")
    )
    true = saved["true"]
    mine = saved["pred_argmax"] == true
    theirs = other_lp.argmax(axis=-1) == true
    b, c = int((mine & ~theirs).sum()), int((~mine & theirs).sum())
    found = result["compare"]["argmax"]
    assert (found["b_only_model_correct"], found["c_only_other_correct"]) == (b, c)
    assert b + c > 0
    statistic = (abs(b - c) - 1) ** 2 / (b + c)
    assert found["statistic"] == pytest.approx(statistic)
    assert found["p_value"] == pytest.approx(chi2.sf(statistic, 1))
    assert result["compare"]["pairs"] == 66 * 12
    assert set(result["compare"]) >= {"hungarian", "argmax", "other"}


def test_files_markdown_and_plots(evaluated):
    out, result, _ = evaluated
    for name in ("confusion_argmax.png", "confusion_hungarian.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    text = (out / "evaluation.md").read_text()
    assert "Table I layout" in text and "McNemar" in text and "identity permutation" in text
    lead_acc = result["statistics"]["argmax"]["lead_accuracy"]
    assert f"{100 * lead_acc:.2f}" in text
    matrix = np.array(result["statistics"]["argmax"]["confusion_matrix"])
    assert matrix.sum() == 66 * 12


def test_model_errors_are_one_line(env, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    empty = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(tracking_uri=empty, registry_uri=empty).create_registered_model("lead-id")
    cases = [
        (["models:/lead-id@champion", "--tracking-uri", empty], "leadtune search"),
        (["models:/other@champion", "--tracking-uri", env.tracking_uri], "unknown model"),
        (["models:/lead-id/9", "--tracking-uri", env.tracking_uri], "no version 9"),
        (["models:/lead-id@champion", "--tracking-uri", "http://127.0.0.1:9"], "does not answer"),
        (
            ["models:/lead-id@champion", "--tracking-uri", f"sqlite:///{tmp_path}/no.db"],
            "not found",
        ),
        ([str(tmp_path / "nothing-here")], "unknown model"),
    ]
    for args, expected in cases:
        assert main(["evaluate", *args, "--out", str(tmp_path / "x")]) == 2
        # MLflow itself may log INFO lines first (creating tables); ours is one line.
        err = [line for line in capsys.readouterr().err.splitlines() if "leadtune" in line]
        assert len(err) == 1 and err[0].startswith("leadtune: error:"), err
        assert expected in err[0], err
