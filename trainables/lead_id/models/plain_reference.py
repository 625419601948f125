"""A plain PyTorch rendering of the reference lead-ID model: the baseline for speed and equality.

Written the direct way, one module per layer of the paper's description, with nothing fused:
``(N, C, T)`` convolutions, four separate BatchNorms per Inception block, ``torch.cat`` of the
branches, ``nn.MaxPool1d``, a transpose before ``nn.GRU``. This is how the released reference
computes, and it is what ``leadtune bench`` measures the fast model against.

Its parameters and buffers have the same names and shapes as :class:`LeadIdentifier`'s (the fast
model keeps the plain module layout and only computes differently), so
:func:`copy_weights` moves weights either way and the outputs can be compared one to one.
Only the reference architecture is rendered: encoder ``inception_gru``, context ``sab``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from leadtune.trainables.lead_id.models.registry import ModelConfig

BRANCH_CHANNELS = 32
BOTTLENECK_CHANNELS = 64
GRU_HIDDEN = 128
GRU_LAYERS = 2
HEAD_HIDDEN = (256, 128)


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
        nn.BatchNorm1d(out_channels),
        nn.ReLU(inplace=True),
    )


class PlainInceptionBlock(nn.Module):
    """1x1 | 1x1 -> k5 | 1x1 -> k11 | MaxPool(3) -> 1x1, each conv + BatchNorm + ReLU; concat."""

    def __init__(self, in_channels: int, bottleneck: int, branch: int) -> None:
        super().__init__()
        self.pointwise = _conv_bn_relu(in_channels, branch, 1)
        self.kernel5 = nn.Sequential(
            _conv_bn_relu(in_channels, bottleneck, 1), _conv_bn_relu(bottleneck, branch, 5)
        )
        self.kernel11 = nn.Sequential(
            _conv_bn_relu(in_channels, bottleneck, 1), _conv_bn_relu(bottleneck, branch, 11)
        )
        self.pooled = nn.Sequential(
            nn.MaxPool1d(3, stride=1, padding=1), _conv_bn_relu(in_channels, branch, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(
            [self.pointwise(x), self.kernel5(x), self.kernel11(x), self.pooled(x)], dim=1
        )


class PlainAttentionPooling(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.projection = nn.Linear(hidden, hidden, bias=False)
        self.score = nn.Linear(hidden, 1, bias=False)

    def forward(self, states: Tensor) -> Tensor:
        weights = torch.softmax(self.score(torch.tanh(self.projection(states))), dim=1)
        return (weights * states).sum(dim=1)


class PlainRecurrentSummary(nn.Module):
    def __init__(self, input_size: int, hidden: int) -> None:
        super().__init__()
        self.gru = nn.GRU(input_size, hidden, num_layers=GRU_LAYERS, batch_first=True)
        self.pooling = PlainAttentionPooling(hidden)

    def forward(self, sequence: Tensor) -> Tensor:
        return self.pooling(self.gru(sequence)[0])


class PlainInceptionGRUEncoder(nn.Module):
    """Two Inception blocks with MaxPool(2) after each, GRU, attention pooling, Linear + ReLU."""

    def __init__(self, d_model: int, width: float) -> None:
        super().__init__()
        branch = _scaled(BRANCH_CHANNELS, width)
        hidden = _scaled(GRU_HIDDEN, width)
        self.features = nn.Sequential(
            PlainInceptionBlock(1, 1, branch),
            nn.MaxPool1d(2),
            PlainInceptionBlock(4 * branch, _scaled(BOTTLENECK_CHANNELS, width), branch),
            nn.MaxPool1d(2),
        )
        self.summary = PlainRecurrentSummary(4 * branch, hidden)
        self.projection = nn.Sequential(nn.Linear(hidden, d_model), nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        return self.projection(self.summary(self.features(x).transpose(1, 2)))


class PlainSetAttentionBlock(nn.Module):
    """x = LN(x + MHA(x, x, x)); x = LN(x + W2 GELU(W1 x))."""

    def __init__(self, d_model: int, heads: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.attention_dropout = nn.Dropout(dropout)
        self.attention_norm = nn.LayerNorm(d_model)
        self.feed_forward = nn.Sequential(
            nn.Linear(d_model, ffn_mult * d_model),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(ffn_mult * d_model, d_model),
            nn.Dropout(dropout),
        )
        self.feed_forward_norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, ignore_keys: Tensor) -> Tensor:
        attended = self.attention(x, x, x, key_padding_mask=ignore_keys, need_weights=False)[0]
        x = self.attention_norm(x + self.attention_dropout(attended))
        return self.feed_forward_norm(x + self.feed_forward(x))


class PlainSetContext(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            PlainSetAttentionBlock(config.d_model, config.heads, config.ffn_mult, config.dropout)
            for _ in range(config.depth)
        )

    def forward(self, features: Tensor, mask: Tensor) -> Tensor:
        ignore_keys = ~mask & mask.any(dim=1, keepdim=True)
        for block in self.blocks:
            features = block(features, ignore_keys)
        return features


class PlainHead(nn.Module):
    def __init__(self, d_model: int, n_classes: int, dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_features = d_model
        for width in HEAD_HIDDEN:
            layers += [nn.Linear(in_features, width), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_features = width
        layers.append(nn.Linear(in_features, n_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features)


class PlainLeadIdentifier(nn.Module):
    """The reference model, plainly: ``forward(x (B, K, T), mask (B, K) | None) -> (B, K, M)``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        if (config.encoder, config.context) != ("inception_gru", "sab"):
            raise ValueError(
                f"the plain rendering covers only the reference inception_gru + sab, got "
                f"{config.encoder} + {config.context}; use create_model for other models"
            )
        self.config = config
        self.encoder = PlainInceptionGRUEncoder(config.d_model, config.width)
        self.context = PlainSetContext(config)
        self.head = PlainHead(config.d_model, config.n_classes, config.dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        batch, leads, samples = x.shape
        waveforms = x.reshape(batch * leads, 1, samples)
        if mask is None:
            mask = torch.ones(batch, leads, dtype=torch.bool, device=x.device)
            features = self.encoder(waveforms)
        else:
            present = mask.reshape(-1)
            encoded = self.encoder(waveforms[present])
            features = encoded.new_zeros(batch * leads, encoded.shape[-1])
            features[present] = encoded
        return self.head(self.context(features.reshape(batch, leads, -1), mask))


def create_plain_model(config: ModelConfig | None = None, **overrides: object) -> nn.Module:
    """The plain reference model for ``config`` (default: the reference, D = 128)."""
    import dataclasses

    config = dataclasses.replace(config or ModelConfig(), **overrides)  # type: ignore[arg-type]
    return PlainLeadIdentifier(config)


def copy_weights(source: nn.Module, target: nn.Module) -> nn.Module:
    """Copy every parameter and buffer of ``source`` into ``target`` (fast <-> plain), in place.

    Both models name their tensors alike; a missing, extra or differently shaped tensor is an
    error rather than being skipped. Returns ``target``.
    """
    source_state = source.state_dict()
    target_state = target.state_dict()
    missing = sorted(set(target_state) - set(source_state))
    extra = sorted(set(source_state) - set(target_state))
    reshaped = sorted(
        name
        for name in set(source_state) & set(target_state)
        if source_state[name].shape != target_state[name].shape
    )
    if missing or extra or reshaped:
        raise ValueError(
            f"cannot copy weights: models differ (missing {missing[:3]}, extra {extra[:3]}, "
            f"other shapes {reshaped[:3]}); build both from the same ModelConfig"
        )
    target.load_state_dict(source_state, strict=True)
    return target
