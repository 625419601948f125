"""Tests for the lead-ID models (leadtune.trainables.lead_id.models): parameter counts against hand arithmetic and the paper, the
set properties (permutation equivariance, padded leads ignored), config validation, and a
forward + backward pass of every encoder x context combination.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch

from leadtune.trainables import catalogue as models_commands
from leadtune.trainables.lead_id.models import (
    CONTEXTS,
    ENCODERS,
    ModelConfig,
    count_parameters,
    create_model,
    describe_models,
    register_encoder,
)
from leadtune.trainables.lead_id.models.encoders import (
    PAPER_ENCODER_PARAMETERS,
    released_unused_encoder_parameters,
)
from leadtune.trainables.lead_id.models.lead_identifier import (
    RELEASED_PARAMETERS,
    released_unused_parameters,
)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Run these tiny models on one thread: with two OpenMP threads on a busy 2-core machine,
    the GRU's per-step barriers made this file 10-30x slower (5 s vs 50-150 s measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- parameter arithmetic by hand (independent of the modules under test) -------------------


def conv_bn(c_in: int, c_out: int, k: int) -> int:
    return c_in * c_out * k + c_out + 2 * c_out  # weight + bias, BatchNorm weight + bias


def linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def gru(n_in: int, hidden: int, layers: int) -> int:
    first = 3 * (n_in * hidden + hidden * hidden + 2 * hidden)
    return first + (layers - 1) * 3 * (2 * hidden * hidden + 2 * hidden)


def inception_block(c_in: int, bottleneck: int, branch: int = 32) -> int:
    return (
        conv_bn(c_in, branch, 1)
        + conv_bn(c_in, bottleneck, 1)
        + conv_bn(bottleneck, branch, 5)
        + conv_bn(c_in, bottleneck, 1)
        + conv_bn(bottleneck, branch, 11)
        + conv_bn(c_in, branch, 1)
    )


def attention_pooling(hidden: int = 128) -> int:
    return linear(hidden, hidden, bias=False) + linear(hidden, 1, bias=False)


def set_attention_block(d: int, ffn_mult: int = 4) -> int:
    attention = linear(d, 3 * d) + linear(d, d)
    feed_forward = linear(d, ffn_mult * d) + linear(ffn_mult * d, d)
    return attention + feed_forward + 2 * 2 * d  # two LayerNorms


def head(d: int, classes: int = 12) -> int:
    return linear(d, 256) + linear(256, 128) + linear(128, classes)


def encoder_by_hand(name: str, d: int = 128) -> int:
    inception_stack = inception_block(1, 1) + inception_block(128, 64)
    recurrent = gru(128, 128, 2) + attention_pooling()
    return {
        "cnn": conv_bn(1, 32, 17)
        + conv_bn(32, 64, 11)
        + conv_bn(64, 128, 7)
        + conv_bn(128, 256, 5)
        + linear(256, d),
        # the stand-alone branched CNN narrows block 2's bottlenecks to 56 (see encoders.py)
        "inception": inception_block(1, 1) + inception_block(128, 56) + linear(128, d),
        "gru": gru(1, 128, 2) + attention_pooling() + linear(128, d),
        "cnn_gru": conv_bn(1, 32, 15)
        + conv_bn(32, 64, 15)
        + conv_bn(64, 128, 11)
        + recurrent
        + linear(128, d),
        "inception_gru": inception_stack + recurrent + linear(128, d),
    }[name]


def test_hand_arithmetic_matches_the_hints_of_the_notes() -> None:
    # GRU(1, 128, 2) = 149,376 and attention W + v = 16,512 are given in the brief.
    assert gru(1, 128, 2) == 149_376
    assert attention_pooling() == 16_512
    assert encoder_by_hand("gru") == 182_400


def test_reference_model_count_is_the_released_count_without_its_unused_layers() -> None:
    model = create_model()
    expected = encoder_by_hand("inception_gru") + 5 * set_attention_block(128) + head(128)
    assert count_parameters(model) == expected == 1_349_076
    # Released code: 1,367,393, holding 18,317 parameters its forward pass never uses.
    assert expected + released_unused_parameters(128) == RELEASED_PARAMETERS[128] == 1_367_393
    assert count_parameters(model.encoder) == 290_248
    assert count_parameters(model.context) == 991_360
    assert count_parameters(model.head) == 67_468


def test_d64_model_count_is_the_released_checkpoint_without_its_unused_layers() -> None:
    model = create_model(d_model=64)
    expected = encoder_by_hand("inception_gru", 64) + 5 * set_attention_block(64) + head(64)
    assert count_parameters(model) == expected == 582_996
    assert expected + released_unused_parameters(64) == RELEASED_PARAMETERS[64] == 592_161


@pytest.mark.parametrize("name", sorted(PAPER_ENCODER_PARAMETERS))
def test_encoder_parameter_counts_against_table_vi(name: str) -> None:
    encoder = ENCODERS[name](ModelConfig(encoder=name))
    count = count_parameters(encoder)
    assert count == encoder_by_hand(name)
    paper = PAPER_ENCODER_PARAMETERS[name]
    if name == "inception_gru":
        # Table VI counts the released encoder's unused skip Linear, gate and LayerNorm.
        assert count + released_unused_encoder_parameters(128) == paper
    else:
        assert abs(count - paper) / paper <= 0.02


def test_context_parameter_counts() -> None:
    config = ModelConfig()
    d = config.d_model
    assert count_parameters(CONTEXTS["none"](config)) == 0
    deepsets = 4 * linear(d, d) + linear(2 * d, d)  # phi (3), rho (1), merge
    assert count_parameters(CONTEXTS["deepsets"](config)) == deepsets == 98_944
    assert count_parameters(CONTEXTS["sab"](config)) == 5 * set_attention_block(d)
    isab_block = 2 * set_attention_block(d) + config.inducing_points * d
    assert count_parameters(CONTEXTS["isab"](config)) == 5 * isab_block == 1_992_960


# --- shapes and set properties ----------------------------------------------------------------


@pytest.mark.parametrize("leads", [12, 6])
def test_reference_output_shape(leads: int) -> None:
    torch.manual_seed(0)
    model = create_model().eval()
    with torch.no_grad():
        logits = model(torch.randn(2, leads, 1000))
    assert logits.shape == (2, leads, 12)
    assert torch.isfinite(logits).all()


def small_model(context: str, encoder: str = "cnn", **overrides: object) -> torch.nn.Module:
    torch.manual_seed(1)
    settings = dict(d_model=16, heads=4, depth=2, inducing_points=4) | overrides
    return create_model(encoder=encoder, context=context, **settings).double().eval()


@pytest.mark.parametrize("context", ["none", "deepsets", "sab", "isab"])
def test_permuting_leads_permutes_logits(context: str) -> None:
    model = small_model(context)
    generator = torch.Generator().manual_seed(2)
    # Leads of different amplitudes, so that each lead has clearly different logits.
    scale = torch.linspace(0.2, 3.0, 7, dtype=torch.float64).reshape(1, 7, 1)
    x = scale * torch.randn(3, 7, 200, generator=generator, dtype=torch.float64)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, [2, 5]] = False
    permutation = torch.randperm(7, generator=generator)
    with torch.no_grad():
        logits = model(x, mask)
        permuted = model(x[:, permutation], mask[:, permutation])
    present = mask[:, permutation]
    # float64: equivariance holds to rounding error, far below how much leads' logits differ.
    torch.testing.assert_close(
        permuted[present], logits[:, permutation][present], atol=1e-10, rtol=0
    )
    assert (permuted[present] - logits[present]).abs().max() > 1e-4


@pytest.mark.parametrize("context", ["none", "deepsets", "sab", "isab"])
def test_padded_leads_do_not_change_present_leads(context: str) -> None:
    model = small_model(context)
    generator = torch.Generator().manual_seed(3)
    ecg = torch.randn(1, 12, 200, generator=generator, dtype=torch.float64)
    padded = ecg.clone()
    padded[:, 8:] = 1e3 * torch.randn(1, 4, 200, generator=generator, dtype=torch.float64)
    mask = torch.ones(1, 12, dtype=torch.bool)
    mask[:, 8:] = False
    with torch.no_grad():
        with_padding = model(padded, mask)[:, :8]
        alone = model(ecg[:, :8])
    torch.testing.assert_close(with_padding, alone, atol=1e-5, rtol=0)


def test_reference_padded_batch_equals_each_ecg_alone() -> None:
    torch.manual_seed(4)
    model = create_model().eval()
    x = torch.randn(2, 12, 1000)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 8:] = False  # the brief's case: last 4 leads padded
    mask[1, [0, 5, 9]] = False  # padding anywhere works the same
    x[~mask] = 50.0  # garbage that would show if it leaked
    with torch.no_grad():
        batched = model(x, mask)
        for ecg in range(2):
            alone = model(x[ecg : ecg + 1, mask[ecg]])
            torch.testing.assert_close(batched[ecg, mask[ecg]], alone[0], atol=1e-5, rtol=1e-5)


def test_padded_leads_do_not_move_batchnorm_statistics_in_training() -> None:
    # Only present leads are encoded, so a training-mode forward (BatchNorm on batch statistics)
    # gives the present leads the same logits as the unpadded batch.
    model = small_model("sab", encoder="inception_gru").train()
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 200, generator=generator, dtype=torch.float64)
    padded = torch.cat([x, torch.full((2, 3, 200), 7.0, dtype=torch.float64)], dim=1)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[:, 6:] = False
    torch.testing.assert_close(model(padded, mask)[:, :6], model(x), atol=1e-8, rtol=0)


# --- every combination trains ---------------------------------------------------------------


@pytest.mark.parametrize("context", sorted(CONTEXTS))
@pytest.mark.parametrize("encoder", sorted(ENCODERS))
def test_every_combination_runs_forward_and_backward(encoder: str, context: str) -> None:
    torch.manual_seed(6)
    model = create_model(
        encoder=encoder, context=context, d_model=16, heads=4, depth=1, inducing_points=4
    )
    x = torch.randn(2, 3, 200)
    mask = torch.tensor([[True, True, True], [True, False, True]])
    logits = model(x, mask)
    assert logits.shape == (2, 3, 12)
    target = torch.tensor([[0, 4, 9], [1, 0, 11]])
    loss = torch.nn.functional.cross_entropy(logits[mask], target[mask])
    loss.backward()
    # Every parameter takes part (no dead layers like the released code's) and is finite.
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"encoder": "resnet"}, "unknown encoder 'resnet'; known: cnn, cnn_gru, gru, inception"),
        ({"context": "lstm"}, "unknown context 'lstm'; known: deepsets, isab, none, sab"),
        ({"d_model": 100}, "heads=8 does not divide d_model=100"),
        ({"depth": 0}, "depth must be an integer >= 1, got 0"),
        ({"heads": 0}, "heads must be an integer >= 1"),
        ({"n_classes": 1}, "n_classes must be an integer >= 2"),
        ({"dropout": 1.0}, "dropout must be in [0, 1)"),
        ({"widht": 3}, "unknown model setting(s) widht"),
        ({"width": 0}, "width must be in"),
    ],
)
def test_invalid_configurations_raise_one_line_errors(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError) as raised:
        create_model(**overrides)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_bad_inputs_are_reported() -> None:
    model = small_model("none")
    with pytest.raises(ValueError, match="shape \\(batch, leads, samples\\)"):
        model(torch.randn(12, 200, dtype=torch.float64))
    with pytest.raises(ValueError, match="lead mask must be a bool tensor of shape \\(1, 4\\)"):
        model(torch.randn(1, 4, 200, dtype=torch.float64), torch.ones(1, 4))


def test_registering_a_new_encoder_makes_it_buildable() -> None:
    @register_encoder("mean_amplitude")
    def mean_amplitude(config: ModelConfig) -> torch.nn.Module:
        """test encoder"""
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(config.d_model))

    try:
        model = create_model(encoder="mean_amplitude", context="deepsets", d_model=8, heads=1)
        assert model(torch.randn(2, 5, 50)).shape == (2, 5, 12)
        with pytest.raises(ValueError, match="already registered"):
            register_encoder("mean_amplitude")(mean_amplitude)
    finally:
        del ENCODERS["mean_amplitude"]


def test_builtin_block_names_match_what_the_modules_register() -> None:
    """The static names that let a driver check a configuration without torch."""
    from leadtune.trainables.lead_id.models import registry

    registered_encoders = set(ENCODERS) - {"mean_amplitude"}
    assert set(registry.BUILTIN_ENCODERS) == registered_encoders
    assert set(registry.BUILTIN_CONTEXTS) == set(CONTEXTS)


def test_checking_a_configuration_imports_no_torch() -> None:
    """A search's driver checks every trial's configuration; it must not pay for torch."""
    code = (
        "import sys\n"
        "from leadtune.trainables.lead_id.config import LeadIdConfig\n"
        "LeadIdConfig.from_dict({'encoder': 'cnn_gru', 'context': 'isab'})\n"
        "try:\n"
        "    LeadIdConfig.from_dict({'encoder': 'resnet'})\n"
        "except ValueError as exc:\n"
        "    assert 'known: cnn, cnn_gru' in str(exc), exc\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --- describe_models and `leadtune models` ----------------------------------------------------


def test_describe_models_lists_everything_registered() -> None:
    rows = describe_models()
    names = {(row["kind"], row["name"]) for row in rows}
    assert names == {("encoder", name) for name in ENCODERS} | {
        ("context", name) for name in CONTEXTS
    } | {("model", "reference"), ("model", "reference-d64")}
    by_name = {row["name"]: row for row in rows}
    # the released configuration is named beside leadtune train's default (D = 128)
    assert by_name["reference-d64"]["parameters"] == 582_996
    assert by_name["reference-d64"]["published_parameters"] == 592_161
    assert "D=64" in str(by_name["reference-d64"]["description"])
    assert "default" in str(by_name["reference"]["description"])
    assert by_name["cnn_gru"]["parameters"] == encoder_by_hand("cnn_gru")
    assert by_name["reference"]["parameters"] == 1_349_076
    assert by_name["reference"]["published_parameters"] == 1_367_393


def run_models_command(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="leadtune")
    models_commands.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["models", *argv])
    code = args.func(args)
    return code, capsys.readouterr().out


def test_models_command_prints_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, table = run_models_command([], capsys)
    assert code == 0
    assert "inception_gru" in table and "1,349,076" in table and "1,367,393" in table
    code, text = run_models_command(["--d-model", "64", "--json"], capsys)
    assert code == 0
    rows = {row["name"]: row for row in json.loads(text)}
    assert rows["reference"]["parameters"] == 582_996
    assert "reference-d64" not in rows  # already the reference row at --d-model 64
    assert rows["gru"]["parameters"] == encoder_by_hand("gru", 64)


def test_models_command_module_imports_without_torch() -> None:
    code = "import sys, leadtune.trainables.catalogue; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("name", sorted(PAPER_ENCODER_PARAMETERS))
def test_width_scales_every_encoder_and_keeps_shapes(name: str) -> None:
    full = count_parameters(ENCODERS[name](ModelConfig(encoder=name)))
    narrow_encoder = ENCODERS[name](ModelConfig(encoder=name, width=0.25, d_model=16))
    assert count_parameters(narrow_encoder) < full / 5
    assert narrow_encoder(torch.randn(3, 1, 200)).shape == (3, 16)
