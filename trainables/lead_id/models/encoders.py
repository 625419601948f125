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

The Inception blocks compute in channels-last layout with fused branches (see InceptionBlock):
the same function and parameters as the direct rendering in ``plain_reference.py``, faster on a
CPU; ``leadtune bench`` measures the difference. The fused pieces they call in CPU training
(BatchNorm + ReLU, the max poolings, the block input products, time-major attention pooling)
are in ``fused.py``, beside the C++ kernels they dispatch to (``kernels.py``); the GRU's are in
``recurrent.py``. Both paths are tested against PyTorch's modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from leadtune.trainables.lead_id.models.fused import (
    BlockInputProducts,
    TimeMajorAttentionPooling,
    batch_norm_relu,
    conv_rows,
    folded_linear,
    max_pool3_rows,
    max_pool_time,
    time_windows,
)
from leadtune.trainables.lead_id.models.recurrent import (
    gru_inference,
    gru_layers,
    use_gru_inference,
    use_gru_layers,
)
from leadtune.trainables.lead_id.models.registry import register_encoder

if TYPE_CHECKING:
    from leadtune.trainables.lead_id.models.registry import ModelConfig

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

    The modules and parameters are those of that description (so are the state_dict keys), but
    the computation is restructured for speed, in channels-last ``(N, T, C)`` layout: 1x1 convs
    are matrix products over ``(N * T, C)`` rows (in training, those reading the block input are
    one ``BlockInputProducts``), k5 and k11 are channels-last convs, the four branch BatchNorms
    + ReLUs are one function writing straight into the concatenated output (with a MaxPool(2)
    that follows fused into it, see ``forward_channels_last``), conv biases go to the BatchNorm
    after them, and in eval mode every BatchNorm is folded into the conv before it. When the block's input is narrow (the first block reads one
    channel), the four branch convs are a single matrix product over the columns [input, k5 and
    k11 windows of the bottlenecks, pooled input] with a block-diagonal weight.
    ``trainables.lead_id.models.plain_reference`` keeps the direct rendering; tests check the two agree.
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
        # One matrix product over [input, bottleneck windows, pooled input] when that is narrow.
        self.single_product = 2 * in_channels + 16 * bottleneck_channels <= 64

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C, T) -> (N, 4 * branch, T)``."""
        return self.forward_channels_last(x.transpose(1, 2).contiguous()).transpose(1, 2)

    def forward_channels_last(
        self, x: Tensor, pool: bool = False, time_major: bool = False
    ) -> Tensor:
        """``(N, T, C) -> (N, T, 4 * branch)``, both contiguous.

        With ``pool``, MaxPool(2) over time follows: ``(N, T // 2, 4 * branch)``. In training it
        is fused into the block's last BatchNorm + ReLU, and with ``time_major`` the result is a
        view of ``(T // 2, N, 4 * branch)`` memory (the layout the GRU reads).
        """
        batch, steps, channels = x.shape
        rows = x.reshape(batch * steps, channels)
        if not self.training:
            out = self._folded_forward(x, rows).view(batch, steps, self.out_channels)
            return max_pool_time(out, 2, 2) if pool else out
        convs, norms = self._convs_and_norms()
        if self.single_product:
            parts = [self._single_product(x, rows)]
        else:
            parts = self._branch_parts(rows, batch)
        out = batch_norm_relu(
            parts, norms, [conv.bias for conv in convs], steps if pool else 0, time_major
        )
        return out if pool else out.view(batch, steps, self.out_channels)

    def _convs_and_norms(self) -> tuple[list[nn.Conv1d], list[nn.BatchNorm1d]]:
        """The four branch-output convs and their BatchNorms, in output-channel order."""
        layers = (self.pointwise, self.kernel5[1], self.kernel11[1], self.pooled[1])
        return [layer[0] for layer in layers], [layer[1] for layer in layers]

    # --- training: batch statistics; convs without their biases (BatchNorm takes them) ---

    def _bottleneck(self, layer: nn.Sequential, pre_activation: Tensor) -> Tensor:
        """BatchNorm + ReLU of a 1x1 bottleneck conv's bias-free output ``(M, b)``."""
        conv, norm = layer[0], layer[1]
        return batch_norm_relu([pre_activation], [norm], [conv.bias])

    def _branch_parts(self, rows: Tensor, batch: int) -> list[Tensor]:
        """Wide input: the four branch convs' outputs before BatchNorm, ``(M, branch)`` each.

        The 1x1 convs that read the input are ``BlockInputProducts``; k5 and k11 are
        channels-last convs over the bottlenecks."""
        convs, _ = self._convs_and_norms()
        pointwise, bottleneck5, bottleneck11, pooled = BlockInputProducts.apply(
            batch,
            rows,
            convs[0].weight.flatten(1),
            self.kernel5[0][0].weight.flatten(1),
            self.kernel11[0][0].weight.flatten(1),
            convs[3].weight.flatten(1),
        )
        windowed = []
        for conv, layer, pre_activation in (
            (convs[1], self.kernel5[0], bottleneck5),
            (convs[2], self.kernel11[0], bottleneck11),
        ):
            source = self._bottleneck(layer, pre_activation)
            windowed.append(conv_rows(source, batch, conv.weight, None))
        return [pointwise, *windowed, pooled]

    def _single_product(self, x: Tensor, rows: Tensor) -> Tensor:
        """Narrow input: every branch conv is one product over the columns
        ``[input, k5 windows of its bottleneck, k11 windows of its bottleneck, pooled input]``
        with a block-diagonal weight, ``(M, 4 * branch)`` before BatchNorm."""
        convs, _ = self._convs_and_norms()
        bottleneck5, bottleneck11 = (
            self._bottleneck(layer, rows @ layer[0].weight.flatten(1).t())
            for layer in (self.kernel5[0], self.kernel11[0])
        )
        columns = self._columns(x, rows, bottleneck5, bottleneck11)
        # The weight as a contiguous (columns, out) matrix: autograd then computes its gradient
        # as columns^T @ grad, which MKL runs twice as fast as (grad^T @ columns)^T here.
        weight = torch.block_diag(*[conv.weight.flatten(1) for conv in convs]).t().contiguous()
        return columns @ weight

    def _columns(
        self, x: Tensor, rows: Tensor, bottleneck5: Tensor, bottleneck11: Tensor
    ) -> Tensor:
        """``(M, C + 5 b + 11 b + C)``: the single product's input columns."""
        batch, steps, _ = x.shape
        convs, _ = self._convs_and_norms()
        pooled = max_pool3_rows(rows, batch)
        return torch.cat(
            [
                x,
                time_windows(bottleneck5.view(batch, steps, -1), convs[1].kernel_size[0]),
                time_windows(bottleneck11.view(batch, steps, -1), convs[2].kernel_size[0]),
                pooled.view(batch, steps, -1),
            ],
            dim=2,
        ).view(batch * steps, -1)

    # --- eval: running statistics, every BatchNorm folded into the conv before it ---

    def _folded_forward(self, x: Tensor, rows: Tensor) -> Tensor:
        """``(M, 4 * branch)`` after ReLU, with every BatchNorm folded into its conv."""
        batch = x.shape[0]
        bottleneck5, bottleneck11 = (
            torch.addmm(bias, rows, weight.t()).relu_()
            for weight, bias in (
                folded_linear(layer[0], layer[1]) for layer in (self.kernel5[0], self.kernel11[0])
            )
        )
        convs, norms = self._convs_and_norms()
        folded = [folded_linear(conv, norm) for conv, norm in zip(convs, norms)]
        if self.single_product:
            columns = self._columns(x, rows, bottleneck5, bottleneck11)
            weight = torch.block_diag(*[w for w, _ in folded])
            bias = torch.cat([b for _, b in folded])
            return torch.addmm(bias, columns, weight.t()).relu_()
        inputs = (rows, bottleneck5, bottleneck11, max_pool3_rows(rows, batch))
        parts = []
        for conv, source, (weight, bias) in zip(convs, inputs, folded):
            if conv.kernel_size[0] == 1:
                parts.append(torch.addmm(bias, source, weight.t()))
            else:
                parts.append(conv_rows(source, batch, weight.view_as(conv.weight), bias))
        return torch.cat(parts, dim=1).relu_()


class InceptionStack(nn.Sequential):
    """Inception block 1 -> MaxPool(2) -> block 2 -> MaxPool(2), run in channels-last layout.

    An ``nn.Sequential`` of exactly those four modules (so the state_dict keys are those of the
    plain stack); ``forward_channels_last`` returns ``(N, T // 4, C)``. In training each block's
    MaxPool(2) runs inside its last BatchNorm + ReLU, and on a CPU the result is written
    time-major, the layout the GRU reads, so no transpose is needed between the convolutions and
    the GRU.
    """

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """``(N, 1, T) -> (N, 4 * branch, T // 4)``."""
        return self.forward_channels_last(x).transpose(1, 2)

    def forward_channels_last(self, x: Tensor) -> Tensor:
        """``(N, C, T)`` waveforms -> ``(N, T // 4, 4 * branch)`` features.

        In CPU training the result is a view of time-major ``(T // 4, N, C)`` memory, which the
        GRU reads without a copy; otherwise it is contiguous.
        """
        hidden = x.transpose(1, 2).contiguous()
        modules = list(self)
        index = 0
        while index < len(modules):
            module = modules[index]
            following = modules[index + 1] if index + 1 < len(modules) else None
            if isinstance(module, InceptionBlock) and module.training and _pairs(following):
                # The pooling runs inside the block's last BatchNorm + ReLU.
                last = index + 2 == len(modules)
                time_major = last and hidden.device.type == "cpu"
                hidden = module.forward_channels_last(hidden, pool=True, time_major=time_major)
                index += 2
                continue
            if isinstance(module, InceptionBlock):
                hidden = module.forward_channels_last(hidden)
            else:
                hidden = max_pool_time(
                    hidden, _single(module.kernel_size), _single(module.stride), 0
                )
            index += 1
        return hidden


def _pairs(module: nn.Module | None) -> bool:
    """Whether ``module`` is MaxPool1d(2) (stride 2, no padding, no dilation, floor mode)."""
    return (
        isinstance(module, nn.MaxPool1d)
        and _single(module.kernel_size) == 2
        and _single(module.stride) == 2
        and _single(module.padding) == 0
        and _single(module.dilation) == 1
        and not module.ceil_mode
        and not module.return_indices
    )


def _single(value: int | tuple[int, ...]) -> int:
    return value if isinstance(value, int) else value[0]


def reference_inception_stack(
    width: float = 1.0, bottleneck: int = INCEPTION_BOTTLENECK_CHANNELS
) -> InceptionStack:
    """Inception block 1 (1-channel bottlenecks) -> MaxPool(2) -> block 2 (64) -> MaxPool(2).

    ``(N, 1, T) -> (N, 4 * branch, T // 4)``; ``branch`` is 32 at width 1.
    """
    branch = scaled(INCEPTION_BRANCH_CHANNELS, width)
    first = InceptionBlock(1, bottleneck_channels=1, branch_channels=branch)
    second = InceptionBlock(
        first.out_channels, bottleneck_channels=scaled(bottleneck, width), branch_channels=branch
    )
    return InceptionStack(first, nn.MaxPool1d(2), second, nn.MaxPool1d(2))


class AttentionPooling(nn.Module):
    """Additive attention over time: ``a_t = softmax_t(v . tanh(W h_t))``, output ``sum_t a_t h_t``.

    ``W`` (hidden x hidden) and ``v`` (hidden) have no bias.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.projection = nn.Linear(hidden_size, hidden_size, bias=False)
        self.score = nn.Linear(hidden_size, 1, bias=False)

    def forward(self, sequence: Tensor, time_major: bool = False) -> Tensor:
        """``(N, L, H) -> (N, H)``, or ``(L, N, H) -> (N, H)`` with ``time_major``."""
        if time_major and sequence.is_contiguous() and torch.is_grad_enabled():
            # CPU training after leadtune's GRU: the gradient comes back time-major in one buffer.
            return TimeMajorAttentionPooling.apply(
                sequence, self.projection.weight, self.score.weight
            )
        time_dim = 0 if time_major else 1
        weights = torch.softmax(self.score(torch.tanh(self.projection(sequence))), dim=time_dim)
        if time_major:
            # (N, 1, L) @ (N, L, H) with the batch as the middle axis of both operands.
            return torch.bmm(weights.permute(1, 2, 0), sequence.transpose(0, 1)).squeeze(1)
        return torch.bmm(weights.transpose(1, 2), sequence).squeeze(1)


class RecurrentSummary(nn.Module):
    """GRU(input, 128, 2 layers) over time, then attention pooling: ``(N, L, C) -> (N, 128)``."""

    def __init__(self, input_size: int, hidden_size: int = GRU_HIDDEN) -> None:
        super().__init__()
        self.gru = nn.GRU(input_size, hidden_size, num_layers=GRU_LAYERS, batch_first=True)
        self.pooling = AttentionPooling(hidden_size)

    def forward(self, sequence: Tensor) -> Tensor:
        if use_gru_layers(self.gru, sequence):  # CPU training: the GRU with a faster backward
            return self.pooling(gru_layers(self.gru, sequence), time_major=True)
        if use_gru_inference(self.gru, sequence):  # CPU inference on the fused kernels
            return self.pooling(gru_inference(self.gru, sequence), time_major=True)
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
        return self.projection(self.features.forward_channels_last(x).mean(dim=1))


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
        return self.projection(self.summary(self.features.forward_channels_last(x)))


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
