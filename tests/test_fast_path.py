"""The fast path computes what the plain rendering of the reference computes.

The fast encoder (channels-last, fused Inception branches, its own BatchNorm backward) is
compared with :mod:`leadtune.trainables.lead_id.models.plain_reference` after copying the weights: in float64
outputs, gradients and BatchNorm statistics agree to rounding; in float32 the outputs agree
within float32 tolerance. The building blocks are checked against PyTorch's own modules, and the
data-on-device training path against the host path.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import wfdb

from leadtune.trainables import runtime
from leadtune.trainables.lead_id.models import ModelConfig, count_parameters, create_model, kernels
from leadtune.trainables.lead_id.models.encoders import AttentionPooling, InceptionBlock
from leadtune.trainables.lead_id.models.fused import (
    BatchNormReLUConcat,
    BlockInputProducts,
    TimeMajorAttentionPooling,
    max_pool3_rows,
    max_pool_time,
)
from leadtune.trainables.lead_id.models.plain_reference import (
    PlainInceptionBlock,
    copy_weights,
    create_plain_model,
)
from leadtune.trainables.lead_id.train import LeadIdData, train_lead_id
from leadtune.trainables.training import LocalReporter

SMALL = ModelConfig(d_model=16, width=0.25, depth=1, heads=2)
SAMPLE = Path(__file__).resolve().parents[1] / "data" / "ptbxl-sample"


def fast_and_plain(config: ModelConfig, dtype: torch.dtype) -> tuple[torch.nn.Module, ...]:
    torch.manual_seed(0)
    fast = create_model(config).to(dtype)
    plain = copy_weights(fast, create_plain_model(config).to(dtype))
    return fast, plain


def ecgs(batch: int, samples: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    scale = torch.linspace(0.2, 1.5, 12, dtype=dtype).reshape(1, 12, 1)
    return scale * torch.randn(batch, 12, samples, generator=generator, dtype=dtype)


def test_reference_sizes_have_equal_parameter_counts() -> None:
    for d_model, expected in ((128, 1_349_076), (64, 582_996)):
        config = ModelConfig(d_model=d_model)
        assert count_parameters(create_model(config)) == expected
        assert count_parameters(create_plain_model(config)) == expected


@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernels", "pytorch-ops"])
@pytest.mark.parametrize("training", [True, False])
def test_float64_outputs_gradients_and_statistics_equal(
    training: bool, fused: bool, monkeypatch
) -> None:
    monkeypatch.setenv(kernels.DISABLE_VARIABLE, "1" if fused else "0")
    assert (kernels.load() is not None) == fused, kernels.failure()
    fast, plain = fast_and_plain(SMALL, torch.float64)
    fast.train(training)
    plain.train(training)
    x = ecgs(3, 202, torch.float64)  # block 2 sees an odd length, 101
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, 9:] = False
    out_fast, out_plain = fast(x, mask), plain(x, mask)
    torch.testing.assert_close(out_fast[mask], out_plain[mask], rtol=1e-10, atol=1e-10)
    weights = torch.randn(
        out_fast.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    grads_fast = torch.autograd.grad(
        (out_fast[mask] * weights[mask]).sum(), list(fast.parameters())
    )
    grads_plain = torch.autograd.grad(
        (out_plain[mask] * weights[mask]).sum(), list(plain.parameters())
    )
    for (name, _), grad_fast, grad_plain in zip(fast.named_parameters(), grads_fast, grads_plain):
        # Conv biases right before a BatchNorm have a zero gradient in exact arithmetic; both
        # give rounding noise there, so those are compared on an absolute scale.
        torch.testing.assert_close(grad_fast, grad_plain, rtol=1e-7, atol=1e-9, msg=name)
    assert any(g.abs().max() > 1e-3 for g in grads_plain)  # the comparison could fail
    for (name, buffer_fast), buffer_plain in zip(fast.named_buffers(), plain.buffers()):
        torch.testing.assert_close(buffer_fast, buffer_plain, rtol=1e-12, atol=1e-12, msg=name)
    if training:  # the running statistics moved, and moved alike
        bn = fast.encoder.features[2].kernel11[0][1]
        assert bn.num_batches_tracked.item() == 1 and bn.running_mean.abs().max() > 1e-4


@pytest.mark.parametrize("training", [True, False])
def test_float32_outputs_equal_within_tolerance(training: bool) -> None:
    fast, plain = fast_and_plain(
        ModelConfig(d_model=32, width=0.5, depth=1, heads=4), torch.float32
    )
    fast.train(training)
    plain.train(training)
    x = ecgs(4, 1000, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-4)


def test_copy_weights_goes_both_ways_and_refuses_other_models() -> None:
    fast, plain = fast_and_plain(SMALL, torch.float64)
    other = create_model(SMALL).double()
    copy_weights(plain, other)
    x = ecgs(2, 200, torch.float64)
    fast.eval(), other.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), other(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot copy weights"):
        copy_weights(fast, create_plain_model(SMALL, d_model=8, heads=2))
    with pytest.raises(ValueError, match="only the reference"):
        create_plain_model(SMALL, encoder="cnn")


def test_inception_block_matches_plain_block_with_ties_and_odd_length() -> None:
    torch.manual_seed(3)
    fast = InceptionBlock(12, 6, 4).double()
    plain = PlainInceptionBlock(12, 6, 4).double()
    plain.load_state_dict(fast.state_dict())
    # Rounded, ReLU'd input: many exact ties inside the pooling windows.
    x = torch.randn(5, 12, 37, dtype=torch.float64).relu().mul(4).round().requires_grad_()
    out_fast, out_plain = fast(x), plain(x)
    torch.testing.assert_close(out_fast, out_plain, rtol=1e-10, atol=1e-10)
    weights = torch.randn_like(out_plain)
    (grad_fast,) = torch.autograd.grad((out_fast * weights).sum(), x)
    (grad_plain,) = torch.autograd.grad((out_plain * weights).sum(), x)
    torch.testing.assert_close(grad_fast, grad_plain, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernels", "pytorch-ops"])
def test_inference_without_autograd_equals_the_plain_model(fused: bool, monkeypatch) -> None:
    monkeypatch.setenv(kernels.DISABLE_VARIABLE, "1" if fused else "0")
    assert (kernels.load() is not None) == fused, kernels.failure()
    fast, plain = fast_and_plain(SMALL, torch.float64)
    fast.eval()
    plain.eval()
    x = ecgs(3, 200, torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernels", "pytorch-ops"])
def test_max_pool_time_equals_max_pool1d_including_tie_gradients(fused: bool, monkeypatch) -> None:
    monkeypatch.setenv(kernels.DISABLE_VARIABLE, "1" if fused else "0")
    assert (kernels.load() is not None) == fused, kernels.failure()
    # odd length; ties inside and across windows
    x = torch.tensor([[[0.0, 2.0, 2.0, 1.0, 1.0, 1.0, 3.0, 0.0, 0.0]]]).repeat(2, 3, 1)
    for kernel, stride, padding in ((2, 2, 0), (3, 1, 1)):
        a = x.clone().requires_grad_()
        b = x.transpose(1, 2).contiguous().requires_grad_()
        expected = F.max_pool1d(a, kernel, stride, padding)
        found = max_pool_time(b, kernel, stride, padding)
        torch.testing.assert_close(found.transpose(1, 2), expected, rtol=0, atol=0)
        with torch.no_grad():  # the inference shortcut gives the same values
            inference = max_pool_time(b.detach(), kernel, stride, padding)
        torch.testing.assert_close(inference.transpose(1, 2), expected, rtol=0, atol=0)
        weights = torch.arange(expected.numel(), dtype=torch.float32).reshape(expected.shape)
        expected.mul(weights).sum().backward()
        found.transpose(1, 2).mul(weights).sum().backward()
        torch.testing.assert_close(b.grad.transpose(1, 2), a.grad, rtol=0, atol=0)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernels", "pytorch-ops"])
@pytest.mark.parametrize("steps", [1, 2, 9, 40])
def test_max_pool3_rows_equal_max_pool1d_including_tie_gradients(
    steps: int, fused: bool, monkeypatch
) -> None:
    monkeypatch.setenv(kernels.DISABLE_VARIABLE, "1" if fused else "0")
    assert (kernels.load() is not None) == fused, kernels.failure()
    generator = torch.Generator().manual_seed(7)
    # Rounded values: many ties, inside windows and at both padded ends.
    x = torch.randint(0, 3, (3, steps, 5), generator=generator).double().requires_grad_()
    expected = F.max_pool1d(x.transpose(1, 2), 3, 1, 1).transpose(1, 2)
    found = max_pool3_rows(x.reshape(-1, 5), 3).view(3, steps, 5)
    torch.testing.assert_close(found, expected, rtol=0, atol=0)
    with torch.no_grad():  # the inference path
        inferred = max_pool3_rows(x.detach().reshape(-1, 5), 3).view(3, steps, 5)
    torch.testing.assert_close(inferred, expected.detach(), rtol=0, atol=0)
    weights = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
    (grad_expected,) = torch.autograd.grad((expected * weights).sum(), x)
    (grad_found,) = torch.autograd.grad((found * weights).sum(), x)
    torch.testing.assert_close(grad_found, grad_expected, rtol=0, atol=1e-12)


def batch_norm_relu_pool_reference(
    parts: list[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor,
    conv_bias: torch.Tensor,
    steps: int,
) -> torch.Tensor:
    """PyTorch's modules: BatchNorm1d (batch statistics) + ReLU, then max_pool1d(2) over time
    when ``steps`` (the rows are sequences of that length); returns ``(N, T', C)`` or rows."""
    x = torch.cat(parts, 1) + conv_bias
    out = F.batch_norm(x, None, None, weight, bias, True).relu()
    if not steps:
        return out
    sequences = out.view(-1, steps, out.shape[1]).transpose(1, 2)
    return F.max_pool1d(sequences, 2).transpose(1, 2)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernels", "pytorch-ops"])
@pytest.mark.parametrize(
    "pool", ["none", "pool", "pool-time-major"], ids=["no-pool", "pool", "pool-time-major"]
)
@pytest.mark.parametrize(
    "widths, scale, shift",
    [((3, 5), 2.0, 1.0), ((8, 16), 2.0, 1.0), ((32, 32, 32, 32), 0.01, 50.0)],
    ids=["narrow", "wide", "wide-offset"],
)
def test_batch_norm_relu_matches_pytorch_in_float64(
    widths: tuple[int, ...], scale: float, shift: float, pool: str, fused: bool, monkeypatch
) -> None:
    # "wide-offset": a mean 5000 standard deviations away from zero, where a one-pass variance
    # without a shift would cancel. Pooled: 20 sequences of an odd length, 15, and values
    # rounded to halves, so that pairs tie (at zero after the ReLU and above it).
    monkeypatch.setenv(kernels.DISABLE_VARIABLE, "1" if fused else "0")
    assert (kernels.load() is not None) == fused, kernels.failure()
    steps = 0 if pool == "none" else 15
    time_major = pool == "pool-time-major"
    generator = torch.Generator().manual_seed(4)
    parts = [
        (
            torch.randn(300, width, generator=generator, dtype=torch.float64).mul(2).round() / 2
            * scale + shift
        ).requires_grad_()
        for width in widths
    ]  # fmt: skip
    channels = sum(widths)
    weight = torch.rand(channels, generator=generator, dtype=torch.float64).add(0.5)
    bias = torch.randn(channels, generator=generator, dtype=torch.float64)
    conv_bias = torch.randn(channels, generator=generator, dtype=torch.float64)
    for tensor in (weight, bias, conv_bias):
        tensor.requires_grad_()
    running_mean = torch.zeros(channels, dtype=torch.float64)
    running_var = torch.ones(channels, dtype=torch.float64)
    out = BatchNormReLUConcat.apply(
        1e-5, 0.1, len(parts), steps, time_major, *parts, weight, bias, running_mean,
        running_var, conv_bias,
    )  # fmt: skip
    if time_major:
        assert out.shape == (7, 20, channels) and out.is_contiguous()
        out = out.transpose(0, 1)
    reference = batch_norm_relu_pool_reference(parts, weight, bias, conv_bias, steps)
    torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-10)
    assert 0.2 < (out > 0).double().mean() < 0.8  # the ReLU mask matters in the gradients
    if steps:  # pairs tie above zero, so the tie rule is exercised
        pairs = torch.cat(parts, 1).detach().view(20, steps, channels)[:, :14].unflatten(1, (7, 2))
        assert (pairs[:, :, 0] == pairs[:, :, 1]).any()
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    inputs = [*parts, weight, bias, conv_bias]
    found = torch.autograd.grad(out, inputs, grad_out)
    expected = torch.autograd.grad(reference, inputs, grad_out)
    for a, b in zip(found[:-1], expected[:-1]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)
    # The conv bias cannot change a training-mode BatchNorm's output: its gradient is zero
    # (autograd's is rounding noise, amplified where the mean is far from zero).
    assert found[-1].abs().max() == 0 and expected[-1].abs().max() < 1e-6
    values = torch.cat(parts, 1).detach() + conv_bias.detach()
    torch.testing.assert_close(running_mean, 0.1 * values.mean(0))
    torch.testing.assert_close(running_var, 0.9 + 0.1 * values.var(0, unbiased=True))


def test_fused_batch_norm_relu_in_float32_is_as_close_to_float64_as_pytorchs() -> None:
    # PyTorch's own float32 BatchNorm is itself ~1e-5 off the float64 truth here (and by how much
    # depends on the thread count), so both are measured against float64.
    if kernels.load() is None:
        pytest.skip(f"fused kernels unavailable: {kernels.failure()}")
    generator = torch.Generator().manual_seed(6)
    parts = [torch.randn(50_000, 32, generator=generator) * 3 + 2 for _ in range(4)]
    weight, bias = torch.rand(128, generator=generator) + 0.5, torch.randn(128, generator=generator)
    inputs = [p.requires_grad_() for p in parts]
    out = BatchNormReLUConcat.apply(
        1e-5, 0.1, 4, 0, False, *inputs, weight, bias, torch.zeros(128), torch.ones(128),
        torch.zeros(128),
    )  # fmt: skip
    pytorch = F.batch_norm(torch.cat(inputs, 1), None, None, weight, bias, True).relu()
    inputs64 = [p.detach().double().requires_grad_() for p in parts]
    truth = F.batch_norm(
        torch.cat(inputs64, 1), None, None, weight.double(), bias.double(), True
    ).relu()
    error, pytorch_error = (
        (out.double() - truth).abs().max(),
        (pytorch.double() - truth).abs().max(),
    )
    assert error <= max(pytorch_error, 1e-6), (error, pytorch_error)
    grad_out = torch.randn(out.shape, generator=generator)
    found = torch.autograd.grad(out, inputs, grad_out)
    by_pytorch = torch.autograd.grad(pytorch, inputs, grad_out)
    true_grads = torch.autograd.grad(truth, inputs64, grad_out.double())
    for a, b, t in zip(found, by_pytorch, true_grads):
        scale = t.abs().max()
        error, pytorch_error = (a.double() - t).abs().max(), (b.double() - t).abs().max()
        assert error <= max(pytorch_error, 1e-6 * scale), (error, pytorch_error)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernels", "pytorch-ops"])
@pytest.mark.parametrize("steps", [1, 2, 9])
def test_block_input_products_equal_separate_convs_including_pooling_ties(
    steps: int, fused: bool, monkeypatch
) -> None:
    monkeypatch.setenv(kernels.DISABLE_VARIABLE, "1" if fused else "0")
    assert (kernels.load() is not None) == fused, kernels.failure()
    generator = torch.Generator().manual_seed(8)
    batch, channels = 4, 8
    # Rounded input: ties inside the MaxPool(3) windows.
    rows = torch.randint(0, 3, (batch * steps, channels), generator=generator).double()
    rows.requires_grad_()
    weights = [
        torch.randn(out, channels, generator=generator, dtype=torch.float64).requires_grad_()
        for out in (3, 5, 5, 2)
    ]
    found = BlockInputProducts.apply(batch, rows, *weights)
    sequences = rows.view(batch, steps, channels).transpose(1, 2)
    pooled = F.max_pool1d(sequences, 3, 1, 1).transpose(1, 2).reshape(-1, channels)
    expected = [rows @ w.t() for w in weights[:3]] + [pooled @ weights[3].t()]
    grads_out = [torch.randn(e.shape, generator=generator, dtype=torch.float64) for e in expected]
    for a, b in zip(found, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    grads_found = torch.autograd.grad(found, [rows, *weights], grads_out)
    grads_expected = torch.autograd.grad(expected, [rows, *weights], grads_out)
    for a, b in zip(grads_found, grads_expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def tiny_data() -> LeadIdData:
    headers = sorted((SAMPLE / "records100").rglob("*_lr.hea"))[:24]
    signals = np.stack([wfdb.rdsamp(str(h.with_suffix("")))[0].T for h in headers])
    signals = signals[:, :, :200].astype(np.float32)
    return LeadIdData(train=signals[:16], val=signals[16:], fs=100, fingerprint="tiny")


def test_data_on_device_path_trains_exactly_like_the_host_path(tiny_data, tmp_path) -> None:
    config = dict(
        encoder="inception_gru", width=0.125, d_model=16, depth=1, heads=2, batch_size=6,
        epochs=2, lr=3e-3, device="cpu",
    )  # fmt: skip
    histories = []
    for on_device in (False, True):
        reporter = LocalReporter(tmp_path / str(on_device))
        train_lead_id(config, tiny_data, reporter, data_on_device=on_device)
        histories.append([(m["train_loss"], m["val_loss"]) for m in reporter.history])
    assert histories[0] == histories[1]
    assert histories[0][0] != histories[0][1]  # it trained, so equality could have failed


def test_training_with_the_plain_model_through_build_model(tiny_data, tmp_path) -> None:
    config = dict(width=0.125, d_model=16, depth=1, heads=2, batch_size=8, epochs=1, device="cpu")
    results = []
    for build in (None, create_plain_model):
        reporter = LocalReporter(tmp_path / ("plain" if build else "fast"))
        results.append(train_lead_id(config, tiny_data, reporter, build_model=build))
    # Same seed, same batches, same weights: float32 rounding is all that differs.
    assert abs(results[0]["train_loss"] - results[1]["train_loss"]) < 1e-3
    assert abs(results[0]["val_loss"] - results[1]["val_loss"]) < 1e-3


def test_runtime_settings() -> None:
    assert runtime.ray_runtime_env() == {"env_vars": runtime.ALLOCATOR_ENV}
    shared = runtime.ray_runtime_env(0.5)["env_vars"]
    assert shared[runtime.GPU_MEMORY_FRACTION_ENV] == "0.5"
    assert runtime.GPU_MEMORY_FRACTION_ENV not in runtime.ray_runtime_env(1.0)["env_vars"]
    tuned = runtime.environment_with_allocator_settings({"PATH": "/bin"})
    assert runtime.allocator_settings_active(tuned) and tuned["PATH"] == "/bin"
    assert not runtime.allocator_settings_active(
        runtime.environment_without_allocator_settings(tuned)
    )
    assert runtime.should_reexec("train", {}) == runtime.sys.platform.startswith("linux")
    assert not runtime.should_reexec("train", tuned)
    assert not runtime.should_reexec("train", {runtime.NO_REEXEC_ENV: "1"})
    assert not runtime.should_reexec("models", {})


def test_bad_gpu_memory_fraction_is_reported(monkeypatch) -> None:
    monkeypatch.setenv(runtime.GPU_MEMORY_FRACTION_ENV, "1.5")
    with pytest.raises(ValueError, match="not a fraction in"):
        runtime.apply_gpu_memory_fraction("cuda:0")
    monkeypatch.delenv(runtime.GPU_MEMORY_FRACTION_ENV)
    assert runtime.apply_gpu_memory_fraction("cuda:0") is None


@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernels", "pytorch-ops"])
@pytest.mark.parametrize("steps", [1, 2, 9])
def test_gru_layers_equal_nn_gru_outputs_and_gradients_in_float64(
    steps: int, fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from leadtune.trainables.lead_id.models.recurrent import (
        gru_inference,
        gru_layers,
        use_gru_inference,
        use_gru_layers,
    )

    monkeypatch.setenv(kernels.DISABLE_VARIABLE, "1" if fused else "0")
    assert (kernels.load() is not None) == fused
    torch.manual_seed(5)
    gru = torch.nn.GRU(3, 6, num_layers=2, batch_first=True).double()
    x = torch.randn(4, steps, 3, dtype=torch.float64, requires_grad=True)
    assert use_gru_layers(gru, x)
    expected = gru(x)[0]
    found = gru_layers(gru, x).transpose(0, 1)
    torch.testing.assert_close(found, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn(expected.shape, dtype=torch.float64)
    inputs = [x, *gru.parameters()]
    grads_expected = torch.autograd.grad((expected * weights).sum(), inputs)
    grads_found = torch.autograd.grad((found * weights).sum(), inputs)
    for grad_found, grad_expected in zip(grads_found, grads_expected):
        torch.testing.assert_close(grad_found, grad_expected, rtol=1e-10, atol=1e-12)
    # the comparison could fail (with one step, W_hh meets only the zero initial state)
    assert all(g.abs().max() > 1e-3 for g in grads_expected if steps > 1 or g.shape != (18, 6))
    with torch.no_grad():  # inference: the kernels' forward where built, else nn.GRU
        assert not use_gru_layers(gru, x)
        assert use_gru_inference(gru, x) == fused
        if fused:
            inferred = gru_inference(gru, x).transpose(0, 1)
            torch.testing.assert_close(inferred, expected.detach(), rtol=1e-12, atol=1e-12)
    assert not use_gru_layers(gru.eval(), x)
    assert not use_gru_inference(gru, x)  # autograd on


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++")
def test_fused_kernels_build_where_a_compiler_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without this, a broken build would only show as a warning and the slower fallback.
    monkeypatch.setenv(kernels.DISABLE_VARIABLE, "1")
    assert kernels.load() is not None, kernels.failure()


def test_time_major_attention_pooling_matches_the_module_and_gradcheck() -> None:
    torch.manual_seed(9)
    pooling = AttentionPooling(6).double()
    sequence = torch.randn(7, 3, 6, dtype=torch.float64, requires_grad=True)  # (L, N, H)
    found = pooling(sequence, time_major=True)
    expected = pooling(sequence.transpose(0, 1).contiguous())  # the module's batch-major path
    torch.testing.assert_close(found, expected, rtol=1e-12, atol=1e-12)
    inputs = (sequence, pooling.projection.weight, pooling.score.weight)
    assert torch.autograd.gradcheck(TimeMajorAttentionPooling.apply, inputs)
