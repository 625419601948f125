"""Per-lead encoders: one waveform in, one feature vector out.

Every encoder maps ``(N, 1, T) -> (N, D)`` and sees each lead alone (``N = B * K``), so the
model's only exchange of information between leads is the context module. The five encoders are
the variants of the paper's Table VI; ``inception_gru`` is the reference.

Parameter counts at D = 128 (encoder alone, final ``Linear(-> D)`` included) against Table VI:

================  ========  ========  =================================================
encoder           ours      Table VI  note
================  ========  ========  =================================================
cnn               278,592   278,592   our design, chosen to match (see CNNEncoder)
inception          69,400    68,844   +0.8 %: block 2 bottlenecks of 56, see InceptionEncoder
gru               182,400   182,400
cnn_gru           353,152   353,152   our design, chosen to match (see CNNGRUEncoder)
inception_gru     290,248   307,017   Table VI counts 16,769 unused parameters, see below
================  ========  ========  =================================================

The released code's inception + GRU encoder also holds layers its forward pass never calls:
a ``Linear(128 -> D)`` skip projection (16,512), a scalar gate (1) and a ``LayerNorm(D)`` (256),
together 16,769 = 307,017 - 290,248 exactly; they are left out here. The stand-alone branched
CNN of Table VI cannot be the reference's blocks: those two blocks plus the ``Linear(128 -> D)``
already hold 75,592 parameters (+9.8 %), so its second block has narrower bottlenecks.

``ModelConfig.width`` scales every encoder's channels and GRU hidden size (1.0 = the sizes
above); small widths make smoke searches and tests fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from trainables.models.registry import register_encoder

if TYPE_CHECKING:
    from trainables.models.registry import ModelConfig

GRU_HIDDEN = 128
GRU_LAYERS = 2
INCEPTION_BRANCH_CHANNELS = 32
INCEPTION_BOTTLENECK_CHANNELS = 64
# The stand-alone branched CNN narrows block 2's bottlenecks so that its size lands on Table VI
# (69,400 vs 68,844 parameters, +0.8 %); inception_gru keeps the reference's 64.
BRANCHED_CNN_BOTTLENECK_CHANNELS = 56


def scaled(channels: int, width: float) -> int:
    """Channel count times the encoder width multiplier (at least 1)."""
    return max(1, round(channels * width))


# Table VI of the paper: parameters of the encoder alone at D = 128.
PAPER_ENCODER_PARAMETERS: dict[str, int] = {
    "cnn": 278_592,
    "inception": 68_844,
    "gru": 182_400,
    "cnn_gru": 353_152,
    "inception_gru": 307_017,
}


def released_unused_encoder_parameters(d_model: int) -> int:
    """Parameters the released inception + GRU encoder builds but never calls, at width D:
    skip ``Linear(128 -> D)``, a scalar gate and ``LayerNorm(D)``. Table VI counts them.
    """
    return (GRU_HIDDEN * d_model + d_model) + 1 + 2 * d_model


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """Conv1d with 'same' padding (odd kernels), then BatchNorm and ReLU.

    The conv keeps its bias although BatchNorm makes it redundant: the released model has it,
    and with it the reference parameter count matches exactly.
    """
    return nn.Sequential(
        nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
        nn.BatchNorm1d(out_channels),
        nn.ReLU(inplace=True),
    )


class InceptionBlock(nn.Module):
    """Four parallel branches of ``branch_channels`` each, concatenated on the channel axis.

    Branches: 1x1 conv; 1x1 bottleneck -> k5 conv; 1x1 bottleneck -> k11 conv;
    MaxPool(3, stride 1, padding 1) -> 1x1 conv. Each conv is followed by BatchNorm and ReLU,
    and every branch keeps the time length.
    """

    def __init__(
        self,
        in_channels: int,
        bottleneck_channels: int,
        branch_channels: int = INCEPTION_BRANCH_CHANNELS,
    ) -> None:
        super().__init__()
        self.pointwise = conv_bn_relu(in_channels, branch_channels, 1)
        self.kernel5 = nn.Sequential(
            conv_bn_relu(in_channels, bottleneck_channels, 1),
            conv_bn_relu(bottleneck_channels, branch_channels, 5),
        )
        self.kernel11 = nn.Sequential(
            conv_bn_relu(in_channels, bottleneck_channels, 1),
            conv_bn_relu(bottleneck_channels, branch_channels, 11),
        )
        self.pooled = nn.Sequential(
            nn.MaxPool1d(3, stride=1, padding=1),
            conv_bn_relu(in_channels, branch_channels, 1),
        )
        self.out_channels = 4 * branch_channels

    def forward(self, x: Tensor) -> Tensor:
        branches = (self.pointwise(x), self.kernel5(x), self.kernel11(x), self.pooled(x))
        return torch.cat(branches, dim=1)


def reference_inception_stack(
    width: float = 1.0, bottleneck: int = INCEPTION_BOTTLENECK_CHANNELS
) -> nn.Sequential:
    """Inception block 1 (1-channel bottlenecks) -> MaxPool(2) -> block 2 (``bottleneck``-channel
    bottlenecks, 64 in the reference) -> MaxPool(2).

    ``(N, 1, T) -> (N, 4 * branch, T // 4)``; ``branch`` is 32 at width 1.
    """
    branch = scaled(INCEPTION_BRANCH_CHANNELS, width)
    first = InceptionBlock(1, bottleneck_channels=1, branch_channels=branch)
    second = InceptionBlock(
        first.out_channels, bottleneck_channels=scaled(bottleneck, width), branch_channels=branch
    )
    return nn.Sequential(first, nn.MaxPool1d(2), second, nn.MaxPool1d(2))


class AttentionPooling(nn.Module):
    """Additive attention over time: ``a_t = softmax_t(v . tanh(W h_t))``, output ``sum_t a_t h_t``.

    ``W`` (hidden x hidden) and ``v`` (hidden) have no bias.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.projection = nn.Linear(hidden_size, hidden_size, bias=False)
        self.score = nn.Linear(hidden_size, 1, bias=False)

    def forward(self, sequence: Tensor) -> Tensor:
        """``(N, L, H) -> (N, H)``."""
        weights = torch.softmax(self.score(torch.tanh(self.projection(sequence))), dim=1)
        return torch.bmm(weights.transpose(1, 2), sequence).squeeze(1)


class RecurrentSummary(nn.Module):
    """GRU(input, 128, 2 layers) over time, then attention pooling: ``(N, L, C) -> (N, 128)``."""

    def __init__(self, input_size: int, hidden_size: int = GRU_HIDDEN) -> None:
        super().__init__()
        self.gru = nn.GRU(input_size, hidden_size, num_layers=GRU_LAYERS, batch_first=True)
        self.pooling = AttentionPooling(hidden_size)

    def forward(self, sequence: Tensor) -> Tensor:
        states, _ = self.gru(sequence)
        return self.pooling(states)


def feature_projection(in_features: int, d_model: int) -> nn.Sequential:
    """The last layer of every encoder: ``Linear(in_features -> D)`` + ReLU."""
    return nn.Sequential(nn.Linear(in_features, d_model), nn.ReLU(inplace=True))


class CNNEncoder(nn.Module):
    """Standard 1D CNN: four conv blocks, global average pooling over time, Linear(256 -> D).

    Conv blocks (each Conv1d 'same' + BatchNorm + ReLU + MaxPool(2)): 1 -> 32 (k17),
    32 -> 64 (k11), 64 -> 128 (k7), 128 -> 256 (k5); kernels shrink as the time axis is
    halved, so the receptive field grows to about 1 s at 100 Hz. The design is ours; it has
    exactly the 278,592 parameters of Table VI at D = 128.
    """

    LAYERS: tuple[tuple[int, int], ...] = ((32, 17), (64, 11), (128, 7), (256, 5))

    def __init__(self, d_model: int = 128, width: float = 1.0) -> None:
        super().__init__()
        layers = tuple((scaled(c, width), k) for c, k in self.LAYERS)
        self.features = conv_pool_stack(layers)
        self.projection = feature_projection(layers[-1][0], d_model)
        self.d_model = d_model

    def forward(self, x: Tensor) -> Tensor:
        return self.projection(self.features(x).mean(dim=-1))


class InceptionEncoder(nn.Module):
    """Branched CNN: two Inception blocks (with their MaxPool(2)), global average pooling over
    time, Linear(128 -> D). Block 2's bottlenecks are 56 channels instead of the reference's 64,
    which puts it at 69,400 parameters at D = 128 (Table VI: 68,844, +0.8 %).
    """

    def __init__(self, d_model: int = 128, width: float = 1.0) -> None:
        super().__init__()
        self.features = reference_inception_stack(width, BRANCHED_CNN_BOTTLENECK_CHANNELS)
        self.projection = feature_projection(4 * scaled(INCEPTION_BRANCH_CHANNELS, width), d_model)
        self.d_model = d_model

    def forward(self, x: Tensor) -> Tensor:
        return self.projection(self.features(x).mean(dim=-1))


class GRUEncoder(nn.Module):
    """GRU(1, 128, 2 layers) over the raw samples, attention pooling, Linear(128 -> D).

    182,400 parameters at D = 128, as in Table VI.
    """

    def __init__(self, d_model: int = 128, width: float = 1.0) -> None:
        super().__init__()
        hidden = scaled(GRU_HIDDEN, width)
        self.summary = RecurrentSummary(1, hidden)
        self.projection = feature_projection(hidden, d_model)
        self.d_model = d_model

    def forward(self, x: Tensor) -> Tensor:
        return self.projection(self.summary(x.transpose(1, 2)))


class CNNGRUEncoder(nn.Module):
    """Standard CNN + GRU: three conv blocks, GRU with attention pooling, Linear(128 -> D).

    Conv blocks (each Conv1d 'same' + BatchNorm + ReLU + MaxPool(2)): 1 -> 32 (k15),
    32 -> 64 (k15), 64 -> 128 (k11); the GRU runs over T / 8 steps. The design is ours; it has
    exactly the 353,152 parameters of Table VI at D = 128.
    """

    LAYERS: tuple[tuple[int, int], ...] = ((32, 15), (64, 15), (128, 11))

    def __init__(self, d_model: int = 128, width: float = 1.0) -> None:
        super().__init__()
        layers = tuple((scaled(c, width), k) for c, k in self.LAYERS)
        hidden = scaled(GRU_HIDDEN, width)
        self.features = conv_pool_stack(layers)
        self.summary = RecurrentSummary(layers[-1][0], hidden)
        self.projection = feature_projection(hidden, d_model)
        self.d_model = d_model

    def forward(self, x: Tensor) -> Tensor:
        return self.projection(self.summary(self.features(x).transpose(1, 2)))


class InceptionGRUEncoder(nn.Module):
    """The reference encoder: Inception block 1 -> MaxPool(2) -> Inception block 2 -> MaxPool(2)
    -> GRU(128, 128, 2 layers) over T / 4 steps -> attention pooling -> Linear(128 -> D).

    290,248 parameters at D = 128 (Table VI's 307,017 includes 16,769 unused ones).
    """

    def __init__(self, d_model: int = 128, width: float = 1.0) -> None:
        super().__init__()
        hidden = scaled(GRU_HIDDEN, width)
        self.features = reference_inception_stack(width)
        self.summary = RecurrentSummary(4 * scaled(INCEPTION_BRANCH_CHANNELS, width), hidden)
        self.projection = feature_projection(hidden, d_model)
        self.d_model = d_model

    def forward(self, x: Tensor) -> Tensor:
        return self.projection(self.summary(self.features(x).transpose(1, 2)))


def conv_pool_stack(layers: tuple[tuple[int, int], ...]) -> nn.Sequential:
    """Conv blocks ``(out_channels, kernel)`` from one input channel, each halving the time axis."""
    modules: list[nn.Module] = []
    in_channels = 1
    for out_channels, kernel_size in layers:
        modules += [*conv_bn_relu(in_channels, out_channels, kernel_size), nn.MaxPool1d(2)]
        in_channels = out_channels
    return nn.Sequential(*modules)


@register_encoder("cnn")
def cnn(config: ModelConfig) -> nn.Module:
    """standard 1D CNN (4 conv blocks, average pooling)"""
    return CNNEncoder(config.d_model, config.width)


@register_encoder("inception")
def inception(config: ModelConfig) -> nn.Module:
    """branched CNN (2 Inception blocks, average pooling)"""
    return InceptionEncoder(config.d_model, config.width)


@register_encoder("gru")
def gru(config: ModelConfig) -> nn.Module:
    """GRU on raw samples, attention pooling"""
    return GRUEncoder(config.d_model, config.width)


@register_encoder("cnn_gru")
def cnn_gru(config: ModelConfig) -> nn.Module:
    """standard CNN (3 conv blocks) + GRU, attention pooling"""
    return CNNGRUEncoder(config.d_model, config.width)


@register_encoder("inception_gru")
def inception_gru(config: ModelConfig) -> nn.Module:
    """reference: 2 Inception blocks + GRU, attention pooling"""
    return InceptionGRUEncoder(config.d_model, config.width)
