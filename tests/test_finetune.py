"""Fine-tuning: which parts learn, the fewer-leads and noise validation, the fine-tuning score,
warm starts from model packages, and the search's scheduler plan."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from leadtune.trainables.data.leads import LEADS
from leadtune.trainables.lead_id import metrics
from leadtune.trainables.lead_id.robustness import (
    CONDITION_KEYS,
    finetune_score,
    validation_conditions,
)
from leadtune.trainables.lead_id.train import LeadIdData, train_lead_id
from leadtune.trainables.training import LocalReporter

REPO = Path(__file__).resolve().parents[1]
RELEASED = REPO / "data" / "models" / "thesis-siglabv2"
TINY = {
    "encoder": "cnn", "context": "sab", "d_model": 16, "depth": 1, "heads": 2, "width": 0.125,
    "batch_size": 8, "epochs": 1, "num_threads": 1, "seed": 0,
}  # fmt: skip


def _data(n_train: int = 24, n_val: int = 12, samples: int = 1000) -> LeadIdData:
    """Real-shaped ECG-like signals: a lead-specific waveform plus noise."""
    rng = np.random.default_rng(0)
    t = np.linspace(0, 10, samples, dtype=np.float32)
    base = np.stack([np.sin(2 * np.pi * (0.8 + 0.15 * k) * t) * (0.2 + 0.1 * k) for k in range(12)])

    def split(n: int) -> np.ndarray:
        return (base[None] + 0.05 * rng.standard_normal((n, 12, samples))).astype(np.float32)

    return LeadIdData(train=split(n_train), val=split(n_val), fs=100, fingerprint="synthetic")


def _trained(tmp_path: Path, **config) -> tuple[dict, dict]:
    reporter = LocalReporter(tmp_path)
    train_lead_id({**TINY, **config}, _data(), reporter=reporter)
    state = torch.load(
        Path(reporter.history[-1]["checkpoint_dir"]) / "checkpoint.pt", weights_only=True
    )
    return reporter.history[-1], state["model"]


def test_frozen_parts_keep_their_weights_and_batchnorm_statistics(tmp_path):
    from leadtune.trainables.lead_id.models import create_model

    start = tmp_path / "start"
    _, weights = _trained(start)
    first = next(start.glob("epoch_*"))
    _, after = _trained(tmp_path / "head", init_from=str(first), train_parts="head", lr=1e-2)
    model = create_model(encoder="cnn", context="sab", d_model=16, depth=1, heads=2, width=0.125)
    for name in model.state_dict():
        same = torch.equal(weights[name], after[name])
        if name.startswith(("encoder.", "context.")):  # running means and variances too
            assert same, f"{name} moved although frozen"
    assert not all(torch.equal(weights[n], after[n]) for n in after if n.startswith("head."))

    _, context_too = _trained(
        tmp_path / "ctx", init_from=str(first), train_parts="context_head", lr=1e-2
    )
    assert all(torch.equal(weights[n], context_too[n]) for n in weights if n.startswith("encoder."))
    assert not all(
        torch.equal(weights[n], context_too[n]) for n in weights if n.startswith("context.")
    )


def test_a_constant_schedule_keeps_the_learning_rate(tmp_path):
    last, _ = _trained(tmp_path, lr=2e-3, lr_schedule="constant")
    assert last["current_lr"] == pytest.approx(2e-3)
    cosine, _ = _trained(tmp_path / "cos", lr=2e-3)
    assert cosine["current_lr"] < 1e-5  # the cosine reached its floor at the end of the run


def test_warm_start_from_the_released_package_reports_the_start_and_the_score(tmp_path):
    config = {
        "encoder": "inception_gru", "context": "sab", "d_model": 64, "depth": 5, "heads": 8,
        "batch_size": 8, "epochs": 1, "num_threads": 2, "init_from": str(RELEASED),
        "robust_validation": True, "train_parts": "head", "lr": 1e-6,
    }  # fmt: skip
    reporter = LocalReporter(tmp_path)
    data = _data(n_train=8, n_val=8)
    last = train_lead_id(config, data, reporter=reporter)
    for key in (*CONDITION_KEYS.values(), "val_robust_accuracy", "start_val_loss"):
        assert 0 <= last[key] < np.inf, key
    expected = finetune_score(last["val_robust_accuracy"], last["val_loss"],
                              last["start_val_loss"], 0.0)  # fmt: skip
    assert last["val_finetune_score"] == pytest.approx(expected)
    # a tiny learning rate on the head barely moves the 12-lead loss from the start's
    assert last["val_loss"] == pytest.approx(last["start_val_loss"], rel=0.05)


def test_a_warm_start_whose_weights_do_not_fit_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="do not fit this model"):
        train_lead_id(
            {**TINY, "init_from": str(RELEASED)}, _data(), reporter=LocalReporter(tmp_path)
        )


def test_finetune_score_ranks_every_allowed_loss_above_every_worse_one():
    assert finetune_score(0.4, 0.070, 0.069, 0.01) == 0.4
    worse = finetune_score(0.9, 0.090, 0.069, 0.01)
    assert worse < 0 < finetune_score(0.01, 0.079, 0.069, 0.01)
    assert finetune_score(0.5, 0.085, 0.069, 0.01) > finetune_score(0.5, 0.095, 0.069, 0.01)


def test_validation_conditions_show_the_named_leads_shuffled_and_labelled():
    signals = np.arange(4 * 12 * 5, dtype=np.float32).reshape(4, 12, 5)
    conditions = {c.name: c for c in validation_conditions(signals, seed=1)}
    assert set(conditions) == set(CONDITION_KEYS)
    three = conditions["3 (I, II, V2)"]
    assert three.signals.shape == (4, 3, 5)
    for n in range(4):  # every channel is the lead its label names
        for k in range(3):
            assert np.array_equal(three.signals[n, k], signals[n, three.labels[n, k]])
        assert sorted(LEADS[i] for i in three.labels[n]) == sorted(("I", "II", "V2"))
    noisy = conditions["noise 0.1 mV"]
    residual = noisy.signals - np.take_along_axis(signals, noisy.labels[:, :, None], axis=1)
    assert 0.07 < residual.std() < 0.13
    again = {c.name: c for c in validation_conditions(signals, seed=1)}
    assert np.array_equal(again["noise 0.1 mV"].signals, noisy.signals)  # same every epoch


def test_exact_mcnemar_by_hand():
    a = np.array([1, 1, 1, 1, 1, 0, 1, 1], bool)  # b = 4 (only a right), c = 1
    b = np.array([0, 0, 0, 0, 1, 1, 1, 1], bool)
    result = metrics.mcnemar_exact(a, b)
    assert (result.b, result.c) == (4, 1)
    assert result.p_value == pytest.approx(2 * 6 / 32)  # P(X <= 1), X ~ Bin(5, 1/2), two-sided
    same = metrics.mcnemar_exact(a, a)
    assert same.p_value == 1.0


def test_scheduler_plan_follows_the_space_and_the_command_line():
    from leadtune.search.settings import SearchSettings
    from leadtune.search.tuner import make_scheduler, plan_search, scheduler_plan
    from leadtune.trainables.tasks import DataRequest

    def planned(**settings):
        data = DataRequest(source=REPO / "data" / "ptbxl-sample")
        return scheduler_plan(plan_search(SearchSettings(data=data, **settings)))

    default = planned(space="smoke")
    assert (default.name, default.fidelity, default.grace_period) == ("asha", "schedule", 25.0)
    finetune = planned(space="lead_id_finetune")
    assert finetune.grace_period == 50.0 and finetune.max_t == 100.0
    by_epoch = planned(space="smoke", fidelity="epoch", epochs=12, reduction_factor=3)
    assert (by_epoch.grace_period, by_epoch.max_t, by_epoch.reduction_factor) == (3.0, 12.0, 3)
    assert make_scheduler(planned(space="smoke", scheduler="median")).__class__.__name__ == (
        "MedianStoppingRule"
    )
    with pytest.raises(ValueError, match="beyond the horizon"):
        planned(space="smoke", fidelity="epoch", epochs=2, grace_period=5)


def _distance(a: dict, b: dict) -> float:
    """Euclidean distance between two state dicts' floating-point weights."""
    return float(
        sum(((a[n].double() - b[n].double()) ** 2).sum() for n in a if a[n].is_floating_point())
        ** 0.5
    )


def test_the_anchor_holds_a_fine_tune_near_its_start(tmp_path):
    start = tmp_path / "start"
    _, weights = _trained(start)
    first = next(start.glob("epoch_*"))
    common = {"init_from": str(first), "lr": 1e-2, "lr_schedule": "constant", "epochs": 2}
    _, free = _trained(tmp_path / "free", **common)
    _, held = _trained(tmp_path / "held", anchor_l2=100.0, **common)
    # Same seed, same batches: only the pull differs, and it must keep the weights nearer.
    assert _distance(held, weights) < 0.5 * _distance(free, weights)


def test_an_anchor_without_start_weights_is_refused():
    from leadtune.trainables.lead_id.config import LeadIdConfig

    with pytest.raises(ValueError, match="anchor_l2 pulls toward"):
        LeadIdConfig.from_dict({"anchor_l2": 0.1})
    with pytest.raises(ValueError, match="anchor_l2 must be in"):
        LeadIdConfig.from_dict({"anchor_l2": -1.0, "init_from": "x"})
