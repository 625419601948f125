"""The diagnosis networks, built by name: ``create_model(config)``.

Every model maps ``(B, C, T)`` signals in mV (C = the configured leads) to ``(B, 5)`` logits of
the diagnostic superclasses. The training split's mean and standard deviation sit inside the
model (:class:`Standardise`, buffers saved with the weights), so a trained or exported model
takes mV directly. Parameter counts for 12 leads and 5 classes (``leadtune models --task
diagnosis``; tests check them):

====================  ===========  ==========================================================
model                 parameters   source, and where this rendering departs from it
====================  ===========  ==========================================================
``resnet1d_wang``       473,349    PTB-XL benchmark (fastai): as described
``inception1d``         507,653    PTB-XL benchmark: as described
``xresnet1d`` (101)   1,872,261    PTB-XL benchmark: as described; depth 18/34/50 also built
``lead_minimal``      1,018,181    Lead-Minimal ECG's ResNet1D (4 blocks, as its train.py
                                   calls it; its README's "3 blocks, ~100K" is not what runs)
``resnet34_1d``      16,606,085    ecg-diagnosis' ResNet-34: as described, its unused dropout
                                   left out
``ecg_xplaim``        3,531,557    ECG-XPLAIM (Keras): PyTorch BatchNorm (momentum 0.01 =
                                   Keras 0.99, eps 1e-3 as Keras), logits out (the sigmoid
                                   goes into the loss)
====================  ===========  ==========================================================

The Standardise buffers add 2 x C numbers (not parameters). ``width`` scales the channels of
every network (1.0 = the sizes above).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leadtune.trainables.diagnosis.config import DiagnosisConfig, resolve_leads

N_CLASSES = 5


def scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


class Standardise(nn.Module):
    """(x - mean) / std with per-lead (or one global, broadcast) statistics as buffers."""

    def __init__(self, leads: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, leads, 1))
        self.register_buffer("std", torch.ones(1, leads, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class DiagnosisNet(nn.Module):
    """Standardise -> backbone -> logits (B, 5)."""

    def __init__(self, leads: int, backbone: nn.Module) -> None:
        super().__init__()
        self.standardise = Standardise(leads)
        self.backbone = backbone

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3:
            raise ValueError(f"expected (batch, leads, samples), got {tuple(x.shape)}")
        return self.backbone(self.standardise(x))


def conv(c_in: int, c_out: int, k: int, stride: int = 1) -> nn.Conv1d:
    return nn.Conv1d(c_in, c_out, k, stride=stride, padding=(k - 1) // 2, bias=False)


class ConcatPool(nn.Module):
    """Global max and average pooling over time, concatenated: (B, C, T) -> (B, 2C)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x.amax(dim=-1), x.mean(dim=-1)], dim=1)


def benchmark_head(channels: int, dropout: float | None) -> nn.Sequential:
    """The PTB-XL benchmark's head: concat pool, BN, dropout .25, Linear(2C -> 128), ReLU, BN,
    dropout .5, Linear(128 -> 5) (``dropout`` replaces both rates)."""
    first, second = (0.25, 0.5) if dropout is None else (dropout, dropout)
    return nn.Sequential(
        ConcatPool(),
        nn.BatchNorm1d(2 * channels),
        nn.Dropout(first),
        nn.Linear(2 * channels, 128),
        nn.ReLU(inplace=True),
        nn.BatchNorm1d(128),
        nn.Dropout(second),
        nn.Linear(128, N_CLASSES),
    )


# -- resnet1d_wang --------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """conv(k1, stride) BN ReLU [dropout] conv(k2) BN, plus the shortcut (1x1 conv + BN where
    the shape changes), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int, k1: int, k2: int,
                 dropout: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        self.body = nn.Sequential(
            conv(c_in, c_out, k1, stride),
            nn.BatchNorm1d(c_out),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout) if dropout else nn.Identity(),
            conv(c_out, c_out, k2),
            nn.BatchNorm1d(c_out),
        )
        self.shortcut = (
            nn.Sequential(conv(c_in, c_out, 1, stride), nn.BatchNorm1d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def resnet1d_wang(leads: int, config: DiagnosisConfig) -> nn.Module:
    c = scaled(128, config.width)
    return nn.Sequential(
        conv(leads, c, 7),
        nn.BatchNorm1d(c),
        nn.ReLU(inplace=True),
        BasicBlock(c, c, 1, 5, 3),
        BasicBlock(c, c, 2, 5, 3),
        BasicBlock(c, c, 2, 5, 3),
        benchmark_head(c, config.dropout),
    )


# -- inception1d ----------------------------------------------------------------------------------


class InceptionBlock1d(nn.Module):
    """1x1 bottleneck to 32, parallel k39/k19/k9 convs, and MaxPool(3) -> 1x1; concat, BN, ReLU."""

    def __init__(self, c_in: int, filters: int) -> None:
        super().__init__()
        self.bottleneck = conv(c_in, filters, 1)
        self.convs = nn.ModuleList(conv(filters, filters, k) for k in (39, 19, 9))
        self.pooled = nn.Sequential(nn.MaxPool1d(3, 1, 1), conv(c_in, filters, 1))
        self.norm = nn.BatchNorm1d(4 * filters)

    def forward(self, x: Tensor) -> Tensor:
        bottleneck = self.bottleneck(x)
        branches = [c(bottleneck) for c in self.convs] + [self.pooled(x)]
        return F.relu(self.norm(torch.cat(branches, dim=1)))


class Inception1d(nn.Module):
    """Six Inception blocks (128 channels), a residual 1x1 conv + BN shortcut around every three,
    no downsampling; the benchmark head."""

    def __init__(self, leads: int, config: DiagnosisConfig) -> None:
        super().__init__()
        filters = scaled(32, config.width)
        channels = 4 * filters
        self.blocks = nn.ModuleList(
            InceptionBlock1d(leads if i == 0 else channels, filters) for i in range(6)
        )
        self.shortcuts = nn.ModuleList(
            nn.Sequential(conv(c_in, channels, 1), nn.BatchNorm1d(channels))
            for c_in in (leads, channels)
        )
        self.head = benchmark_head(channels, config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        residual = x
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i % 3 == 2:
                x = F.relu(x + self.shortcuts[i // 3](residual))
                residual = x
        return self.head(x)


# -- xresnet1d ------------------------------------------------------------------------------------


def conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [conv(c_in, c_out, k, stride), nn.BatchNorm1d(c_out)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class XResBlock(nn.Module):
    """xresnet block: bottleneck 1x1 -> k5 (stride) -> 1x1 (x4), or two k5 convs (expansion 1);
    identity path AvgPool (stride 2) and a 1x1 conv + BN where the width changes."""

    def __init__(self, expansion: int, c_in: int, hidden: int, stride: int) -> None:
        super().__init__()
        c_out = hidden * expansion
        if expansion == 1:
            body = [conv_bn(c_in, hidden, 5, stride), conv_bn(hidden, c_out, 5, relu=False)]
        else:
            body = [
                conv_bn(c_in, hidden, 1),
                conv_bn(hidden, hidden, 5, stride),
                conv_bn(hidden, c_out, 1, relu=False),
            ]
        self.body = nn.Sequential(*body)
        nn.init.zeros_(self.body[-1][1].weight)  # each block starts as the identity (fastai)
        identity: list[nn.Module] = []
        if stride != 1:
            identity.append(nn.AvgPool1d(2, ceil_mode=True))
        if c_in != c_out:
            identity.append(conv_bn(c_in, c_out, 1, relu=False))
        self.identity = nn.Sequential(*identity)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.identity(x))


XRESNET_LAYERS = {18: (1, (2, 2, 2, 2)), 34: (1, (3, 4, 6, 3)), 50: (4, (3, 4, 6, 3)),
                  101: (4, (3, 4, 23, 3))}  # fmt: skip


def xresnet1d(leads: int, config: DiagnosisConfig) -> nn.Module:
    expansion, layers = XRESNET_LAYERS[config.depth]
    stem = [scaled(32, config.width), scaled(32, config.width), scaled(64, config.width)]
    hidden = scaled(64, config.width)  # every stage 64 -> 64 -> 256: the width never doubles
    modules: list[nn.Module] = [
        conv_bn(leads, stem[0], 5, 2),
        conv_bn(stem[0], stem[1], 5),
        conv_bn(stem[1], stem[2], 5),
        nn.MaxPool1d(3, 2, 1),
    ]
    c_in = stem[2]
    for stage, blocks in enumerate(layers):
        for i in range(blocks):
            stride = 2 if stage > 0 and i == 0 else 1
            modules.append(XResBlock(expansion, c_in, hidden, stride))
            c_in = hidden * expansion
    modules.append(benchmark_head(c_in, config.dropout))
    return nn.Sequential(*modules)


# -- lead_minimal ---------------------------------------------------------------------------------


class MinimalBlock(nn.Module):
    """conv k15 (stride) BN ReLU spatial-dropout conv k15 BN + shortcut, ReLU; with stochastic
    depth (one draw per batch in training: a dropped block outputs ReLU(shortcut))."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float, drop: float) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv(c_in, c_out, 15, stride),
            nn.BatchNorm1d(c_out),
            nn.ReLU(inplace=True),
            nn.Dropout1d(dropout),  # whole channels
            conv(c_out, c_out, 15),
            nn.BatchNorm1d(c_out),
        )
        self.shortcut = (
            nn.Sequential(conv(c_in, c_out, 1, stride), nn.BatchNorm1d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )
        self.drop = drop

    def forward(self, x: Tensor) -> Tensor:
        shortcut = self.shortcut(x)
        if self.training and self.drop > 0 and torch.rand(()) < self.drop:
            return F.relu(shortcut)
        return F.relu(self.body(x) + shortcut)


def lead_minimal(leads: int, config: DiagnosisConfig) -> nn.Module:
    widths = [scaled(c, config.width) for c in (32, 64, 128, 128)]
    dropout = 0.3 if config.dropout is None else config.dropout
    deepest = 0.1 if config.stochastic_depth is None else config.stochastic_depth
    modules: list[nn.Module] = [
        nn.Conv1d(leads, widths[0], 15, stride=2, padding=7, bias=False),
        nn.BatchNorm1d(widths[0]),
        nn.ReLU(inplace=True),
        nn.MaxPool1d(2),
    ]
    c_in = widths[0]
    for i, (c_out, stride) in enumerate(zip(widths, (1, 2, 2, 2))):
        modules.append(MinimalBlock(c_in, c_out, stride, dropout, deepest * i / 3))
        c_in = c_out
    modules += [
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(c_in, N_CLASSES),
    ]
    return nn.Sequential(*modules)


# -- resnet34_1d ----------------------------------------------------------------------------------


def resnet34_1d(leads: int, config: DiagnosisConfig) -> nn.Module:
    widths = [scaled(c, config.width) for c in (64, 128, 256, 512)]
    dropout = 0.2 if config.dropout is None else config.dropout
    modules: list[nn.Module] = [
        nn.Conv1d(leads, widths[0], 15, stride=2, padding=7, bias=False),
        nn.BatchNorm1d(widths[0]),
        nn.ReLU(inplace=True),
        nn.MaxPool1d(3, 2, 1),
    ]
    c_in = widths[0]
    for stage, (c_out, blocks) in enumerate(zip(widths, (3, 4, 6, 3))):
        for i in range(blocks):
            stride = 2 if stage > 0 and i == 0 else 1
            modules.append(BasicBlock(c_in, c_out, stride, 7, 7, dropout))
            c_in = c_out
    modules += [ConcatPool(), nn.Linear(2 * c_in, N_CLASSES)]
    return nn.Sequential(*modules)


# -- ecg_xplaim -----------------------------------------------------------------------------------


class MultiKernel(nn.Module):
    """Three parallel convs (k2, k10, k40, 'same' padding, ReLU, no bias), concat, BN, ReLU."""

    def __init__(self, c_in: int, filters: int) -> None:
        super().__init__()
        self.kernels = (2, 10, 40)
        self.convs = nn.ModuleList(nn.Conv1d(c_in, filters, k, bias=False) for k in self.kernels)
        self.norm = nn.BatchNorm1d(3 * filters, eps=1e-3, momentum=0.01)

    def forward(self, x: Tensor) -> Tensor:
        # Keras' 'same' padding: (k - 1) // 2 zeros before, k // 2 after (even kernels too)
        outs = [
            F.relu(c(F.pad(x, ((k - 1) // 2, k // 2)))) for c, k in zip(self.convs, self.kernels)
        ]
        return F.relu(self.norm(torch.cat(outs, dim=1)))


class XplaimBlock(nn.Module):
    """Two multi-kernel layers, a 1x1 conv + BN shortcut, add, ReLU, MaxPool(2)."""

    def __init__(self, c_in: int, filters: int) -> None:
        super().__init__()
        self.body = nn.Sequential(MultiKernel(c_in, filters), MultiKernel(3 * filters, filters))
        self.shortcut = nn.Sequential(
            nn.Conv1d(c_in, 3 * filters, 1, bias=False),
            nn.BatchNorm1d(3 * filters, eps=1e-3, momentum=0.01),
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool1d(F.relu(self.body(x) + self.shortcut(x)), 2)


def ecg_xplaim(leads: int, config: DiagnosisConfig) -> nn.Module:
    filters = [scaled(f, config.width) for f in (16, 32, 128)]
    modules: list[nn.Module] = []
    c_in = leads
    for f in filters:
        modules.append(XplaimBlock(c_in, f))
        c_in = 3 * f
    modules += [nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(c_in, N_CLASSES)]
    return nn.Sequential(*modules)


BUILDERS: dict[str, Callable[[int, DiagnosisConfig], nn.Module]] = {
    "resnet1d_wang": resnet1d_wang,
    "inception1d": Inception1d,
    "xresnet1d": xresnet1d,
    "lead_minimal": lead_minimal,
    "resnet34_1d": resnet34_1d,
    "ecg_xplaim": ecg_xplaim,
}


def create_model(config: DiagnosisConfig) -> DiagnosisNet:
    leads = len(resolve_leads(config.leads))
    return DiagnosisNet(leads, BUILDERS[config.model](leads, config))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
