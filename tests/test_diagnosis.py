"""The diagnosis task: the six networks' sizes and shapes, a training run of each on real
records, the metrics against scikit-learn, thresholds chosen on validation only, and a smoke
search registered under its own name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import brier_score_loss, f1_score, roc_auc_score

from leadtune.cli import main
from leadtune.spaces import get_space
from leadtune.trainables.data.cache import prepare_dataset
from leadtune.trainables.diagnosis import metrics
from leadtune.trainables.diagnosis.config import LEAD_CONFIGS, DiagnosisConfig
from leadtune.trainables.diagnosis.models import count_parameters, create_model
from leadtune.trainables.diagnosis.train import (
    DiagnosisData,
    evaluate_checkpoint,
    predict_probabilities,
    train_diagnosis,
    windows,
)
from leadtune.trainables.tasks import load_trained_model
from leadtune.trainables.training import LocalReporter, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "ptbxl-sample"
# Trainable parameters for 12 leads and 5 classes, as counted in ../shared/DIAGNOSIS_NOTES.md.
PUBLISHED = {
    "resnet1d_wang": 473_349,
    "inception1d": 507_653,
    "xresnet1d": 1_872_261,
    "lead_minimal": 1_018_181,
    "resnet34_1d": 16_606_085,
    "ecg_xplaim": 3_531_557,
}


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_parameter_counts_match_the_sources_and_outputs_are_five_logits(model: str) -> None:
    net = create_model(DiagnosisConfig(model=model))
    assert count_parameters(net) == PUBLISHED[model]
    with torch.no_grad():
        assert net.eval()(torch.randn(3, 12, 250)).shape == (3, 5)
    fewer = create_model(DiagnosisConfig(model=model, leads="I-II-V2", width=0.25))
    assert fewer.standardise.mean.shape == (1, 3, 1)  # input channels follow the leads
    with torch.no_grad():
        assert fewer.eval()(torch.randn(2, 3, 1000)).shape == (2, 5)


def test_lead_minimal_with_one_lead_has_its_published_size() -> None:
    assert count_parameters(create_model(DiagnosisConfig(model="lead_minimal", leads="II"))) == (
        1_012_901
    )


def test_named_lead_configurations_cover_both_tables() -> None:
    points = get_space("lead_subsets").initial_points
    assert len({(p["leads"], p["seed"]) for p in points}) == len(points) == 22
    first_twelve = {p["leads"] for p in points[:12]}  # a study cut to 12 trials spans 12 to 1 lead
    assert len(first_twelve) == 6 and {"12", "II"} <= first_twelve
    assert (
        get_space("lead_subsets").scheduler == "fifo"
    )  # every cell of the table trained to the end
    for name in ("12", "limb6", "I-II-V2", "I-II-III", "II-V2-V5", "I-II", "II-V2", "II", "V5",
                 "I", "V2", "cinc6", "cinc4", "cinc3", "cinc2"):  # fmt: skip
        assert DiagnosisConfig.from_dict({"leads": name}).leads == LEAD_CONFIGS[name]
    with pytest.raises(ValueError, match="leads must be distinct"):
        DiagnosisConfig.from_dict({"leads": "I,XX"})


def test_sliding_windows_cover_the_record_like_the_benchmark() -> None:
    x = np.arange(1000, dtype=np.float32)[None, None].repeat(2, axis=0)
    w = windows(x, 250, 125)
    assert w.shape == (2, 7, 1, 250) and w[0, -1, 0, -1] == 999


# -- metrics against scikit-learn -----------------------------------------------------------------


@pytest.fixture(scope="module")
def scored():
    rng = np.random.default_rng(0)
    labels = (rng.random((200, 5)) < [0.4, 0.2, 0.25, 0.2, 0.1]).astype(np.float32)
    probs = np.clip(labels * 0.3 + rng.random((200, 5)) * 0.7, 0, 1)
    return probs, labels


def test_auroc_f1_and_brier_equal_scikit_learn(scored) -> None:
    probs, labels = scored
    expected = [roc_auc_score(labels[:, c], probs[:, c]) for c in range(5)]
    np.testing.assert_allclose(metrics.class_auroc(probs, labels), expected)
    assert metrics.macro_auroc(probs, labels) == pytest.approx(np.mean(expected))
    thresholds = [0.3, 0.4, 0.5, 0.6, 0.7]
    f1 = [f1_score(labels[:, c], probs[:, c] >= t) for c, t in enumerate(thresholds)]
    np.testing.assert_allclose(metrics.f1_at(probs, labels, thresholds), f1)
    brier = np.mean([brier_score_loss(labels[:, c], probs[:, c]) for c in range(5)])
    assert metrics.brier(probs, labels) == pytest.approx(brier)
    low, high = metrics.bootstrap_macro_auroc(probs, labels, n_boot=200)
    assert low < np.mean(expected) < high


def test_chosen_thresholds_maximise_f1_on_their_own_split(scored) -> None:
    probs, labels = scored
    chosen = metrics.choose_thresholds(probs, labels)
    best = metrics.f1_at(probs, labels, chosen)
    for c in range(5):
        for t in np.linspace(0.05, 0.95, 19):
            assert metrics.f1_at(probs[:, [c]], labels[:, [c]], [t])[0] <= best[c] + 1e-12


def test_the_lead_robustness_score_is_lead_minimals_main_table_form() -> None:
    # 12 leads: 0.7 + 0.3 = 1; a subset with AUROC 0.9 of 0.95 and Brier 0.02 worse
    assert metrics.lead_robustness_score(0.95, 0.08, 0.95, 0.08) == pytest.approx(1.0)
    value = metrics.lead_robustness_score(0.90, 0.10, 0.95, 0.08)
    assert value == pytest.approx(0.7 * 0.90 / 0.95 + 0.3 * (1 - 0.02 / 0.25))


# -- training on real records --------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    dataset = prepare_dataset(SAMPLE, cache_root=tmp_path_factory.mktemp("cache"), progress=False)
    return dataset, DiagnosisData.from_prepared(dataset)


def test_data_keeps_the_labelled_records_only(sample) -> None:
    dataset, data = sample
    train = dataset.indices("train")
    assert len(data.train) == int(dataset.superclasses[train].any(axis=1).sum()) < len(train) + 1
    assert data.train_labels.shape == (len(data.train), 5) and data.train_labels.max() == 1


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_every_model_trains_a_step_on_real_records(model: str, sample, tmp_path) -> None:
    _, data = sample
    reporter = LocalReporter(tmp_path)
    config = {
        "model": model,
        "width": 0.25,
        "epochs": 1,
        "batch_size": 16,
        "max_train_records": 48,
        "max_val_records": 24,
        "device": "cpu",
        "num_threads": 2,
    }
    last = train_diagnosis(config, data, reporter)  # fmt: skip
    assert np.isfinite(last["train_loss"]) and 0 <= last["val_macro_auroc"] <= 1
    model_, cfg, state = load_trained_model(tmp_path / "epoch_001")
    assert cfg.model == model and state["task"] == "diagnosis"


def test_an_exported_diagnosis_model_has_a_diagnosis_model_card(sample, tmp_path) -> None:
    """`leadtune export` takes the card's words and shapes from the task (it once called every
    export a lead-identification model with (B, K, 12) outputs)."""
    _, data = sample
    config = {"width": 0.25, "epochs": 1, "batch_size": 16, "max_train_records": 32,
              "max_val_records": 16, "device": "cpu", "leads": "limb6"}  # fmt: skip
    train_diagnosis(config, data, LocalReporter(tmp_path))
    assert main(["export", str(tmp_path / "epoch_001"), "--out", str(tmp_path / "export")]) == 0
    card = json.loads((tmp_path / "export" / "model_card.json").read_text())
    assert card["name"] == "leadtune diagnosis" and "superclasses" in card["task"]
    assert card["input"]["shape"] == ["B", 6, "T"] and card["output"]["shape"] == ["B", 5]
    assert "exactly the 6 leads" in card["input"]["K"]
    assert "standardises" in card["preprocessing"]["amplitude_normalisation"]
    assert card["verification"]["passed"]
    markdown = (tmp_path / "export" / "MODEL_CARD.md").read_text()
    assert "shape (B, 5)" in markdown and "lead identification" not in markdown


def test_thresholds_are_chosen_on_validation_and_applied_unchanged_to_test(sample, tmp_path):
    dataset, data = sample
    reporter = LocalReporter(tmp_path)
    train_diagnosis({"width": 0.25, "epochs": 3, "batch_size": 32, "device": "cpu"}, data,
                    reporter)  # fmt: skip
    state = load_checkpoint(tmp_path / "epoch_003")
    thresholds = state["metrics"]["val_thresholds"]
    model, cfg, _ = load_trained_model(tmp_path / "epoch_003")
    val_probs = predict_probabilities(model, data.val, cfg, 100, torch.device("cpu"))
    np.testing.assert_allclose(thresholds, metrics.choose_thresholds(val_probs, data.val_labels))
    found = evaluate_checkpoint(tmp_path / "epoch_003", dataset, "test", n_boot=50)
    rows = dataset.indices("test")
    rows = rows[dataset.superclasses[rows].any(axis=1)]
    test_probs = predict_probabilities(model, dataset.signals[rows], cfg, 100, torch.device("cpu"))
    labels = dataset.superclasses[rows].astype(np.float32)
    expected = np.nanmean(metrics.f1_at(test_probs, labels, thresholds))
    assert found["test_macro_f1"] == pytest.approx(expected)
    assert found["test_records"] == len(rows)


def test_a_diagnosis_smoke_search_registers_an_ecg_diagnosis_champion(tmp_path, capsys) -> None:
    import ray

    from leadtune.search.tracking import mlflow_client

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    try:
        code = main([
            "search", "--space", "diagnosis_smoke", "--trials", "2", "--max-concurrent", "2",
            "--epochs", "2", "--storage-path", str(tmp_path / "runs"), "--tracking-uri", uri,
            "--source", str(SAMPLE), "--cache-dir", str(tmp_path / "cache"), "--json",
        ])  # fmt: skip
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert code == 0
    outcome = json.loads(capsys.readouterr().out)
    assert outcome["task"] == "diagnosis" and outcome["promotion"]["registered_model"] == (
        "ecg-diagnosis"
    )
    champion = mlflow_client(uri).get_model_version_by_alias("ecg-diagnosis", "champion")
    assert champion.tags["leadtune.task"] == "diagnosis"
    assert 0 <= float(champion.tags["leadtune.test_macro_auroc"]) <= 1
    # the search gain: the champion against the space's reference point (trial 0)
    gain = outcome["promotion"]["search_gain"]
    assert gain["validation"]["metric"] == "val_macro_auroc"
    assert "search gain" in champion.description
    if gain.get("test"):  # the reference point is not the champion: a paired bootstrap
        test = gain["test"]
        assert test["ci_low"] <= test["difference"] <= test["ci_high"]
        assert 0 <= test["p_value"] <= 1 and test["metric"] == "test_macro_auroc"
        assert test["a"] == pytest.approx(float(champion.tags["leadtune.test_macro_auroc"]))
    assert main(["evaluate", "models:/ecg-diagnosis@champion", "--tracking-uri", uri,
                 "--source", str(SAMPLE), "--cache-dir", str(tmp_path / "cache"),
                 "--n-boot", "50", "--out", str(tmp_path / "eval")]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "macro AUROC" in text and "| NORM |" in text


def test_the_lead_subsets_study_becomes_its_table_with_one_command(
    tmp_path, capsys, monkeypatch
) -> None:
    """A small lead_subsets study (two configurations x two seeds, one epoch) on the sample,
    then `leadtune report` with a relative --storage-path, as a user types it: the table has
    one row per configuration, 12 leads first with retention 100 % and LRS 1."""
    import csv

    import ray

    monkeypatch.chdir(tmp_path)
    try:
        code = main([
            "search", "--space", "lead_subsets", "--trials", "4", "--max-concurrent", "2",
            "--epochs", "1", "--storage-path", "runs", "--source", str(SAMPLE),
            "--cache-dir", "cache", "--json",
        ])  # fmt: skip
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert code == 0
    capsys.readouterr()
    assert main(["report", "--study", "lead_subsets", "--storage-path", "runs"]) == 0
    out = capsys.readouterr().out
    assert "| leads | n | macro AUROC" in out
    (table,) = list(Path("runs").glob("lead_subsets/search-*/report/lead_subsets/lead_subsets.csv"))
    rows = list(csv.DictReader(table.open()))
    assert [r["leads"] for r in rows] == ["12", "I-II-V2"]
    assert [r["n_leads"] for r in rows] == ["12", "3"] and all(r["seeds"] == "2" for r in rows)
    assert float(rows[0]["retention"]) == pytest.approx(1.0)
    assert float(rows[0]["lrs"]) == pytest.approx(1.0)
    for r in rows:
        assert float(r["auroc_ci_low"]) <= float(r["auroc"]) <= float(r["auroc_ci_high"])
    assert table.with_name("lead_subsets.png").is_file()


def test_paired_bootstrap_of_the_macro_auroc_difference() -> None:
    from leadtune.trainables.diagnosis.metrics import paired_bootstrap_macro_auroc

    rng = np.random.default_rng(0)
    labels = (rng.random((200, 5)) < 0.3).astype(np.float32)
    noisy = np.clip(labels * 0.6 + rng.random(labels.shape) * 0.6, 0, 1)
    same = paired_bootstrap_macro_auroc(noisy, noisy, labels, n_boot=200)
    assert same["difference"] == 0 and same["ci_low"] == same["ci_high"] == 0
    assert same["p_value"] == 1.0
    chance = rng.random(labels.shape)
    better = paired_bootstrap_macro_auroc(noisy, chance, labels, n_boot=200)
    assert better["a"] > 0.8 and better["b"] == pytest.approx(0.5, abs=0.1)
    assert better["ci_low"] > 0 and better["p_value"] < 0.01
