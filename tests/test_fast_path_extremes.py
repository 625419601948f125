"""The fast path on what real ECGs hold: the same function as PyTorch's modules, not only on
standard normals.

Real recordings carry electrode pops, pacemaker spikes and saturated amplifiers (PTB-XL's
record 11813 peaks at 31.3 mV; the bundled sample's record 421 at 9.7 mV), flat and constant
leads, runs of equal samples, and batches of one. Each kernel and the whole model are compared
here with PyTorch's own modules in float64 on such inputs, forward and backward, on the fused
kernels and on the PyTorch-ops path, and in float32 against the float64 truth (with a stated
tolerance). The last tests train on real records, artefacts included, on both paths.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import wfdb

from leadtune.trainables.lead_id.models import ModelConfig, create_model, kernels
from leadtune.trainables.lead_id.models.fused import BatchNormReLUConcat, max_pool3_rows
from leadtune.trainables.lead_id.models.plain_reference import copy_weights, create_plain_model
from leadtune.trainables.lead_id.models.recurrent import gru_inference, gru_layers
from leadtune.trainables.lead_id.train import LeadIdData, train_lead_id
from leadtune.trainables.training import LocalReporter

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "ptbxl-sample"
SUBSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "ptbxl-subset"
SMALL = ModelConfig(d_model=16, width=0.25, depth=1, heads=2)
PATHS = pytest.mark.parametrize("fused", [True, False], ids=["fused-kernels", "pytorch-ops"])


def use_path(monkeypatch: pytest.MonkeyPatch, fused: bool) -> None:
    monkeypatch.setenv(kernels.DISABLE_VARIABLE, "1" if fused else "0")
    if fused and kernels.load() is None:
        pytest.skip(f"fused kernels unavailable: {kernels.failure()}")
    assert (kernels.load() is not None) == fused


def read_lr(record_id: int, root: Path = SAMPLE) -> np.ndarray:
    """(12, 1000) mV of one PTB-XL 100 Hz record."""
    name = root / "records100" / f"{record_id // 1000 * 1000:05d}" / f"{record_id:05d}_lr"
    return wfdb.rdsamp(str(name))[0].T.astype(np.float64)


def real_batch(kind: str, samples: int = 202) -> torch.Tensor:
    """A float64 batch built from real sample records, with one real-data extreme each."""
    records = np.stack([read_lr(i)[:, :samples] for i in (1, 2, 421)])  # 421: a 9.7 mV peak
    x = torch.from_numpy(records.copy())
    if kind.startswith("spike"):  # an electrode pop: 5 samples of +-S mV in one lead
        x[1, 3, 80:85] += float(kind.split("_")[1])
    elif kind == "flat_and_constant":  # a disconnected lead (0) and a saturated one (constant)
        x[0, 5] = 0.0
        x[2, 8] = 4.096
    elif kind == "all_zero_record":
        x[1] = 0.0
    elif kind == "clipped":  # an amplifier at its rails: long runs of equal values
        x = x.clamp(-0.25, 0.25)
    elif kind == "batch_of_one":
        x = x[2:3].clone()
        x[0, 0, 100:105] = 300.0
    return x


KINDS = [
    "spike_20", "spike_-50", "spike_300", "flat_and_constant", "all_zero_record", "clipped",
    "batch_of_one",
]  # fmt: skip


def fast_and_plain(dtype: torch.dtype, config: ModelConfig = SMALL):
    torch.manual_seed(0)
    fast = create_model(config).to(dtype)
    plain = copy_weights(fast, create_plain_model(config).to(dtype))
    return fast, plain


def outputs_and_gradients(model: torch.nn.Module, x: torch.Tensor, weights: torch.Tensor):
    out = model(x)
    grads = torch.autograd.grad((out * weights).sum(), list(model.parameters()))
    return out, grads


@PATHS
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", KINDS)
def test_whole_model_equals_pytorch_modules_in_float64_on_real_extremes(
    kind: str, training: bool, fused: bool, monkeypatch
) -> None:
    use_path(monkeypatch, fused)
    fast, plain = fast_and_plain(torch.float64)
    fast.train(training)
    plain.train(training)
    x = real_batch(kind)
    weights = torch.randn(len(x), 12, 12, generator=torch.Generator().manual_seed(2)).double()
    out_fast, grads_fast = outputs_and_gradients(fast, x, weights)
    out_plain, grads_plain = outputs_and_gradients(plain, x, weights)
    assert torch.isfinite(out_plain).all()
    torch.testing.assert_close(out_fast, out_plain, rtol=1e-9, atol=1e-9)
    for (name, _), a, b in zip(fast.named_parameters(), grads_fast, grads_plain):
        assert torch.isfinite(a).all(), name
        # conv biases before a training-mode BatchNorm: zero in exact arithmetic (see
        # test_fast_path.py), rounding noise in both, so compared on an absolute scale
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8, msg=name)
    if training:
        for (name, a), b in zip(fast.named_buffers(), plain.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


# float32 against the float64 truth. PyTorch's own float32 modules are the yardstick: the fast
# path must be finite, and no further from the truth than FLOAT32_SLACK times PyTorch's error or
# FLOAT32_FLOOR times the largest value of its kind (the largest output, the largest gradient of
# any parameter: float32 sums carry errors of the size of their terms, not of their result).
FLOAT32_SLACK = 4.0
FLOAT32_FLOOR = 1e-5


def assert_as_close_as_pytorch(found, pytorch, truth, scale: float, name: str) -> None:
    assert torch.isfinite(found).all(), name
    error = (found.double() - truth).abs().max().item()
    pytorch_error = (pytorch.double() - truth).abs().max().item()
    assert error <= max(FLOAT32_SLACK * pytorch_error, FLOAT32_FLOOR * scale), (
        name,
        error,
        pytorch_error,
        scale,
    )


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("spike", [30.0, 300.0, -300.0])
def test_float32_fused_path_with_a_spike_is_as_accurate_as_pytorch(
    spike: float, training: bool, monkeypatch
) -> None:
    """The issue's case: a real batch with a 5-sample spike in one lead; the fused float32 path
    used to return NaN from 30 mV on (glibc's finite-only vector exp in the GRU)."""
    use_path(monkeypatch, True)
    config = ModelConfig(d_model=32, width=0.5, depth=2, heads=4)
    fast, plain32 = fast_and_plain(torch.float32, config)
    truth = copy_weights(fast, create_plain_model(config).double())
    for model in (fast, plain32, truth):
        model.train(training)
    x = real_batch(f"spike_{spike}", samples=1000)
    weights = torch.randn(len(x), 12, 12, generator=torch.Generator().manual_seed(3))
    out_fast, grads_fast = outputs_and_gradients(fast, x.float(), weights)
    out_plain, grads_plain = outputs_and_gradients(plain32, x.float(), weights)
    out_true, grads_true = outputs_and_gradients(truth, x, weights.double())
    assert_as_close_as_pytorch(out_fast, out_plain, out_true, out_true.abs().max(), "outputs")
    largest = max(t.abs().max().item() for t in grads_true)
    for (name, _), a, b, t in zip(fast.named_parameters(), grads_fast, grads_plain, grads_true):
        assert_as_close_as_pytorch(a, b, t, largest, name)


@PATHS
@pytest.mark.parametrize("magnitude", [30.0, 1e3, 1e5])
def test_gru_with_saturated_gates_equals_nn_gru(magnitude: float, fused: bool, monkeypatch) -> None:
    """Pre-activations far in both tails of the sigmoid and tanh (where exp overflows)."""
    use_path(monkeypatch, fused)
    torch.manual_seed(5)
    gru = torch.nn.GRU(4, 8, num_layers=2, batch_first=True).double()
    x = torch.randn(3, 9, 4, dtype=torch.float64)
    x[0, 2] = magnitude
    x[1, 4] = -magnitude
    x[2, 6, :2] = magnitude
    x[2, 6, 2:] = -magnitude
    x.requires_grad_()
    expected = gru(x)[0]
    found = gru_layers(gru, x).transpose(0, 1)
    torch.testing.assert_close(found, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn(expected.shape, dtype=torch.float64)
    inputs = [x, *gru.parameters()]
    grads_expected = torch.autograd.grad((expected * weights).sum(), inputs)
    grads_found = torch.autograd.grad((found * weights).sum(), inputs)
    for a, b in zip(grads_found, grads_expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if fused:
        with torch.no_grad():
            inferred = gru_inference(gru, x.detach()).transpose(0, 1)
        torch.testing.assert_close(inferred, expected.detach(), rtol=1e-12, atol=1e-12)
        # float32 on the kernels: finite, and within float32 rounding of the truth
        with torch.no_grad():
            single = gru_inference(gru.float(), x.detach().float()).transpose(0, 1)
        assert torch.isfinite(single).all()
        torch.testing.assert_close(single.double(), expected.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["spike", "zero_variance", "two_rows", "huge_mean"])
@PATHS
def test_batch_norm_relu_on_real_extremes_equals_pytorch(case: str, fused: bool, monkeypatch):
    """A 1e4 spike among 1e-3 values (the variance must not cancel), constant channels (zero
    variance), the fewest rows PyTorch's training-mode BatchNorm accepts (two), and a mean 1e6
    standard deviations away from zero."""
    use_path(monkeypatch, fused)
    generator = torch.Generator().manual_seed(11)
    rows, widths = (2, (16, 16)) if case == "two_rows" else (400, (16, 16))
    parts = [torch.randn(rows, w, generator=generator, dtype=torch.float64) for w in widths]
    if case == "spike":
        parts[0] = parts[0] * 1e-3
        parts[0][7, :] = 1e4  # the first rows are ordinary: no shift by the first row helps
        parts[1][399, 3] = -3e2
    elif case == "zero_variance":
        parts[0][:, :5] = 0.0
        parts[1][:, 2] = 2.5
    elif case == "huge_mean":
        parts[0] = parts[0] * 1e-3 + 1e3
    parts = [p.requires_grad_() for p in parts]
    channels = sum(widths)
    weight = (torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(channels, generator=generator, dtype=torch.float64).requires_grad_()
    conv_bias = torch.zeros(channels, dtype=torch.float64, requires_grad=True)
    out = BatchNormReLUConcat.apply(
        1e-5, 0.1, len(parts), 0, False, *parts, weight, bias,
        torch.zeros(channels, dtype=torch.float64), torch.ones(channels, dtype=torch.float64),
        conv_bias,
    )  # fmt: skip
    reference = F.batch_norm(torch.cat(parts, 1), None, None, weight, bias, True).relu()
    torch.testing.assert_close(out, reference, rtol=1e-9, atol=1e-9)
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    found = torch.autograd.grad(out, [*parts, weight, bias], grad_out)
    expected = torch.autograd.grad(reference, [*parts, weight, bias], grad_out)
    for a, b in zip(found, expected):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)


@PATHS
def test_poolings_keep_runs_of_equal_values_and_pass_nans_on(fused: bool, monkeypatch) -> None:
    use_path(monkeypatch, fused)
    x = torch.zeros(2, 40, 3, dtype=torch.float64)
    x[0, 5:30] = 2.5  # a long plateau (a clipped amplifier)
    x[1, :, 1] = torch.nan
    expected = F.max_pool1d(x.transpose(1, 2), 3, 1, 1).transpose(1, 2)
    with torch.no_grad():
        found = max_pool3_rows(x.reshape(-1, 3), 2).view_as(x)
    torch.testing.assert_close(found, expected, rtol=0, atol=0, equal_nan=True)


def training_losses(data: LeadIdData, tmp_path: Path, fused: bool, monkeypatch) -> list[float]:
    use_path(monkeypatch, fused)
    losses: list[float] = []
    config = dict(
        width=0.25, d_model=32, depth=2, heads=4, batch_size=8, epochs=2, lr=1e-3,
        device="cpu", seed=3,
    )  # fmt: skip
    reporter = LocalReporter(tmp_path / ("fast" if fused else "ops"))
    train_lead_id(config, data, reporter)
    for metrics in reporter.history:
        losses += [metrics["train_loss"], metrics["val_loss"]]
    return losses


# Two epochs of the reference architecture at 1/4 width, fast path against PyTorch ops from the
# same seed and batches: float32 rounding differs, nothing else. Stated tolerance on the losses:
LOSS_TOLERANCE = 2e-3


def check_same_training(data: LeadIdData, tmp_path: Path, monkeypatch) -> None:
    fast = training_losses(data, tmp_path, True, monkeypatch)
    ops = training_losses(data, tmp_path, False, monkeypatch)
    assert all(np.isfinite(fast)), fast
    np.testing.assert_allclose(fast, ops, rtol=LOSS_TOLERANCE, atol=LOSS_TOLERANCE)
    assert fast[0] != fast[2]  # it trained: equality of the two paths could have failed


def test_training_on_real_records_with_artefacts_agrees_across_paths(tmp_path, monkeypatch):
    """Bundled-sample records with their largest peaks (421: 9.7 mV, 473: 7.6 mV) in every
    batch, and one of them carrying an added 300 mV electrode pop."""
    ids = [421, 473, *range(1, 23)]
    signals = np.stack([read_lr(i) for i in ids]).astype(np.float32)
    signals[0, 4, 500:505] += 300.0
    data = LeadIdData(train=signals[:16], val=signals[16:], fs=100, fingerprint="artefacts")
    check_same_training(data, tmp_path, monkeypatch)


@pytest.mark.skipif(not SUBSET.is_dir(), reason="needs ../shared/data/ptbxl-subset")
def test_training_on_the_subsets_31_mv_record_agrees_across_paths(tmp_path, monkeypatch):
    """PTB-XL record 11813 (a 31.3 mV artefact, the record that made the fused path NaN) and
    9018 (10.2 mV), with ordinary records of the shared subset."""
    ids = [11813, 9018, *range(1, 23)]
    signals = np.stack([read_lr(i, SUBSET) for i in ids]).astype(np.float32)
    assert np.abs(signals[0]).max() > 25  # 28.5 mV raw, 31.3 mV after the high-pass filter
    data = LeadIdData(train=signals[:16], val=signals[16:], fs=100, fingerprint="subset")
    check_same_training(data, tmp_path, monkeypatch)


@pytest.mark.parametrize("row", [0, 4097], ids=["first-row", "middle-row"])
def test_float32_batch_norm_statistics_do_not_cancel_around_a_spike(row: int, monkeypatch):
    """A 1e4 spike among values of order 1e-2, in float32. The kernel centres every block of
    rows on its own mean, so the spike's row (the first row included, which an earlier version
    used as the shift for every row) does not wipe out the other rows' variance."""
    use_path(monkeypatch, True)
    generator = torch.Generator().manual_seed(12)
    part = torch.randn(20_000, 16, generator=generator) * 1e-2
    part[row] = 1e4
    # The spike sets mean 0.5 and std 70.7; the bias lifts the other rows, at -0.0071 after
    # normalising, above the ReLU's threshold.
    weight, bias = torch.ones(16), torch.full((16,), 0.0075)
    out = BatchNormReLUConcat.apply(
        1e-5, 0.1, 1, 0, False, part, weight, bias, torch.zeros(16), torch.ones(16),
        torch.zeros(16),
    )  # fmt: skip
    pytorch = F.batch_norm(part, None, None, weight, bias, True).relu()
    truth = F.batch_norm(part.double(), None, None, weight.double(), bias.double(), True).relu()
    others = torch.ones(len(part), dtype=torch.bool)
    others[row] = False  # the ordinary rows, on their own scale (the spike's row dwarfs them)
    assert_as_close_as_pytorch(out[row], pytorch[row], truth[row], truth[row].max(), "spike")
    assert_as_close_as_pytorch(
        out[others], pytorch[others], truth[others], truth[others].max(), "other rows"
    )
    assert truth[others].max() > 1e-6  # the comparison could fail
