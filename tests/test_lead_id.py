"""The lead-ID training function as a plain Python function: learning, resume, augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import wfdb

from leadtune.trainables.lead_id.config import LeadIdConfig
from leadtune.trainables.lead_id.train import LeadIdData, augment_batch, train_lead_id
from leadtune.trainables.tasks import load_trained_model
from leadtune.trainables.training import LocalReporter

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "ptbxl-sample"
TINY = dict(encoder="cnn", context="sab", d_model=16, depth=1, heads=2, batch_size=8, lr=3e-3)


@pytest.fixture(scope="module")
def tiny_data() -> LeadIdData:
    """30 real ECGs from the bundled sample, cropped to 2.5 s so a tiny model trains quickly."""
    headers = sorted((SAMPLE / "records100").rglob("*_lr.hea"))[:30]
    signals = np.stack([wfdb.rdsamp(str(h.with_suffix("")))[0].T for h in headers])
    signals = signals[:, :, :250].astype(np.float32)
    return LeadIdData(train=signals[:22], val=signals[22:], fs=100, fingerprint="tiny")


class Interrupt(Exception):
    pass


class StopAfter(LocalReporter):
    """A reporter that 'kills' the run right after a given epoch's checkpoint is written."""

    stop_after: int = 0

    def report(self, metrics, checkpoint_dir):
        super().report(metrics, checkpoint_dir)
        if metrics["epoch"] == self.stop_after:
            raise Interrupt


def test_resume_reproduces_the_uninterrupted_loss_curve(tiny_data, tmp_path):
    config = {**TINY, "epochs": 4, "seed": 3, "dropout": 0.1}
    full = LocalReporter(tmp_path / "full")
    train_lead_id(config, tiny_data, reporter=full)

    first = StopAfter(tmp_path / "part")
    first.stop_after = 2
    with pytest.raises(Interrupt):
        train_lead_id(config, tiny_data, reporter=first)
    resumed = LocalReporter(tmp_path / "resumed", resume_from=tmp_path / "part" / "epoch_002")
    train_lead_id(config, tiny_data, reporter=resumed)

    assert [m["epoch"] for m in resumed.history] == [3, 4]
    curve = [(m["train_loss"], m["val_loss"]) for m in first.history + resumed.history]
    expected = [(m["train_loss"], m["val_loss"]) for m in full.history]
    np.testing.assert_allclose(curve, expected, rtol=1e-5, atol=1e-6)
    # and the curve is not flat, so the comparison could have failed
    assert abs(expected[0][0] - expected[-1][0]) > 1e-3


def test_training_learns_and_checkpoints_load(tiny_data, tmp_path):
    reporter = LocalReporter(tmp_path)
    last = train_lead_id({**TINY, "epochs": 6, "lr": 5e-3}, tiny_data, reporter=reporter)
    losses = [m["train_loss"] for m in reporter.history]
    assert losses[-1] < losses[0] - 0.2, losses
    for key in ("val_lead_accuracy_hungarian", "val_set_accuracy", "val_set_accuracy_hungarian"):
        assert 0.0 <= last[key] <= 1.0
    model, config, state = load_trained_model(tmp_path / "epoch_006")
    assert state["epoch"] == 6 and config.d_model == 16
    with torch.no_grad():
        out = model(torch.from_numpy(tiny_data.val[:2]))
    assert out.shape == (2, 12, 12)


def test_init_from_starts_at_the_checkpoints_weights(tiny_data, tmp_path):
    """A warm start (fine-tuning) begins with the given run's weights: after one epoch at a
    negligible learning rate the parameters are still the checkpoint's, and a fresh start's
    are not."""
    base = LocalReporter(tmp_path / "base")
    train_lead_id({**TINY, "epochs": 4, "lr": 5e-3}, tiny_data, reporter=base)
    config = {**TINY, "epochs": 1, "lr": 1e-12, "init_from": str(tmp_path / "base" / "epoch_004")}
    train_lead_id(config, tiny_data, reporter=LocalReporter(tmp_path / "warm"))
    train_lead_id(
        {**config, "init_from": None}, tiny_data, reporter=LocalReporter(tmp_path / "fresh")
    )

    def parameters(folder):
        model, _, _ = load_trained_model(folder)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    trained = parameters(tmp_path / "base" / "epoch_004")
    assert torch.allclose(parameters(tmp_path / "warm" / "epoch_001"), trained, atol=1e-6)
    assert not torch.allclose(parameters(tmp_path / "fresh" / "epoch_001"), trained, atol=1e-2)
    with pytest.raises(ValueError, match="do not fit this model"):
        train_lead_id(
            {**config, "d_model": 32}, tiny_data, reporter=LocalReporter(tmp_path / "other")
        )


def test_augment_batch_labels_follow_the_shuffled_leads():
    config = LeadIdConfig(jitter_prob=0.0)
    x = torch.arange(3 * 12 * 5, dtype=torch.float32).reshape(3, 12, 5)
    gen = torch.Generator().manual_seed(0)
    shuffled, labels, mask = augment_batch(x, config, gen)
    assert mask is None
    assert not torch.equal(labels, torch.arange(12).expand(3, 12))
    for b in range(3):
        for j in range(12):
            assert torch.equal(shuffled[b, j], x[b, labels[b, j]])


def test_jitter_is_per_ecg_and_within_bounds():
    config = LeadIdConfig(jitter_prob=1.0, jitter_sigma_min=0.005, jitter_sigma_max=0.01,
                          shuffle_leads=False)  # fmt: skip
    x = torch.zeros(64, 12, 2000)
    noisy, labels, _ = augment_batch(x, config, torch.Generator().manual_seed(1))
    sigma = noisy.flatten(1).std(dim=1)
    assert torch.all(sigma > 0.0045) and torch.all(sigma < 0.0105)
    assert sigma.std() > 1e-4  # one sigma per ECG, not one for the batch
    assert torch.equal(labels, torch.arange(12).expand(64, 12))


def test_precordial_subset_trains_with_six_classes(tiny_data, tmp_path):
    reporter = LocalReporter(tmp_path)
    train_lead_id({**TINY, "epochs": 1, "leads": "precordial"}, tiny_data, reporter=reporter)
    model, config, _ = load_trained_model(tmp_path / "epoch_001")
    assert config.leads == ("V1", "V2", "V3", "V4", "V5", "V6")
    with torch.no_grad():
        assert model(torch.zeros(1, 6, 250)).shape == (1, 6, 6)


def test_loss_restricted_to_a_lead_subset(tiny_data, tmp_path):
    reporter = LocalReporter(tmp_path)
    last = train_lead_id(
        {**TINY, "epochs": 1, "loss_leads": "precordial"}, tiny_data, reporter=reporter
    )
    assert np.isfinite(last["val_loss"])


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"encoder": "transformer"}, "encoder"),
        ({"heads": 3, "d_model": 16}, "heads"),
        ({"leads": "I,II,XX"}, "leads"),
        ({"loss_leads": "V1", "leads": "limb"}, "loss_leads"),
        ({"learning_rate": 1e-3}, "unknown training setting"),
        ({"epochs": 0}, "epochs"),
    ],
)
def test_bad_configs_say_what_is_wrong(bad, message):
    with pytest.raises(ValueError, match=message):
        LeadIdConfig.from_dict({**TINY, **bad})
