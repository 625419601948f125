"""Context across leads: how each lead's features learn about the other leads of its ECG.

Every context maps features ``(B, K, D)`` and a lead mask ``(B, K)`` (True = lead present) to
``(B, K, D)``. All are permutation-equivariant (no positional encoding: the leads are an unordered
set), and a padded lead never changes the output of a present one: it is excluded from every
pooling and masked out as an attention key. The output at padded positions is arbitrary.

- ``none``: identity (each lead classified on its own waveform).
- ``deepsets``: Zaheer et al. 2017; a pooled set vector is appended to every lead.
- ``sab``: a stack of Set Attention Blocks (Lee et al. 2019), the reference context.
- ``isab``: Induced Set Attention Blocks (Lee et al. 2019), attention through m inducing points.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from leadtune.trainables.lead_id.models.registry import register_context

if TYPE_CHECKING:
    from leadtune.trainables.lead_id.models.registry import ModelConfig


def key_padding_mask(mask: Tensor) -> Tensor:
    """Attention key mask (True = ignore) from a lead mask (True = present).

    An ECG with no lead present would give a softmax over nothing (NaN); it attends to all its
    (padded) leads instead, so its outputs are finite and, as for every padded lead, arbitrary.
    """
    return ~mask & mask.any(dim=1, keepdim=True)


class NoContext(nn.Module):
    """Identity: no information passes between leads."""

    def forward(self, features: Tensor, mask: Tensor) -> Tensor:
        return features


class DeepSetsContext(nn.Module):
    """DeepSets: ``s = rho(sum over present leads of phi(x_k))``, then each lead gets
    ``ReLU(Linear(2D -> D)([x_k, s]))``.

    ``phi`` is 3 x (Linear(D -> D) + ReLU), ``rho`` is Linear(D -> D) + ReLU.
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.phi = nn.Sequential(
            nn.Linear(d_model, d_model),
            nn.ReLU(),
            nn.Linear(d_model, d_model),
            nn.ReLU(),
            nn.Linear(d_model, d_model),
            nn.ReLU(),
        )
        self.rho = nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU())
        self.merge = nn.Sequential(nn.Linear(2 * d_model, d_model), nn.ReLU())

    def forward(self, features: Tensor, mask: Tensor) -> Tensor:
        # masked_fill rather than a product: a padded lead holding inf/NaN must still add zero.
        embedded = self.phi(features).masked_fill(~mask.unsqueeze(-1), 0.0)
        pooled = self.rho(embedded.sum(dim=1))
        return self.merge(torch.cat([features, pooled.unsqueeze(1).expand_as(features)], dim=-1))


class MultiheadAttentionBlock(nn.Module):
    """MAB(X, Y) of Lee et al. 2019 in post-norm form:
    ``H = LN(X + MHA(X, Y, Y))``, ``out = LN(H + W2 GELU(W1 H))`` with FFN width ``ffn_mult * D``.
    """

    def __init__(self, d_model: int, heads: int, ffn_mult: int, dropout: float = 0.0) -> None:
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

    def forward(self, queries: Tensor, keys: Tensor, ignore_keys: Tensor | None = None) -> Tensor:
        attended, _ = self.attention(
            queries, keys, keys, key_padding_mask=ignore_keys, need_weights=False
        )
        hidden = self.attention_norm(queries + self.attention_dropout(attended))
        return self.feed_forward_norm(hidden + self.feed_forward(hidden))


class SetAttentionBlock(MultiheadAttentionBlock):
    """SAB(X) = MAB(X, X): every lead attends to every present lead (the reference block)."""

    def forward(self, features: Tensor, ignore_keys: Tensor | None = None) -> Tensor:  # type: ignore[override]
        return super().forward(features, features, ignore_keys)


class InducedSetAttentionBlock(nn.Module):
    """ISAB(X) = MAB(X, MAB(I, X)) with m learned inducing points I.

    The inducing points summarise the present leads (``H = MAB(I, X)``, X masked), then every
    lead reads the summary (``MAB(X, H)``): cost O(K m) instead of O(K^2).
    """

    def __init__(
        self, d_model: int, heads: int, ffn_mult: int, inducing_points: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.inducing_points = nn.Parameter(torch.empty(1, inducing_points, d_model))
        nn.init.xavier_uniform_(self.inducing_points)
        self.summarise = MultiheadAttentionBlock(d_model, heads, ffn_mult, dropout)
        self.broadcast = MultiheadAttentionBlock(d_model, heads, ffn_mult, dropout)

    def forward(self, features: Tensor, ignore_keys: Tensor | None = None) -> Tensor:
        inducing = self.inducing_points.expand(features.shape[0], -1, -1)
        summary = self.summarise(inducing, features, ignore_keys)
        return self.broadcast(features, summary)


class AttentionContext(nn.Module):
    """A stack of attention blocks (SAB or ISAB) sharing one key mask."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, features: Tensor, mask: Tensor) -> Tensor:
        ignore_keys = key_padding_mask(mask)
        for block in self.blocks:
            features = block(features, ignore_keys)
        return features


@register_context("none")
def no_context(config: ModelConfig) -> nn.Module:
    """no context: each lead on its own"""
    return NoContext()


@register_context("deepsets")
def deepsets(config: ModelConfig) -> nn.Module:
    """DeepSets: pooled set vector appended to each lead"""
    return DeepSetsContext(config.d_model)


@register_context("sab")
def sab(config: ModelConfig) -> nn.Module:
    """reference: stack of Set Attention Blocks"""
    return AttentionContext(
        [
            SetAttentionBlock(config.d_model, config.heads, config.ffn_mult, config.dropout)
            for _ in range(config.depth)
        ]
    )


@register_context("isab")
def isab(config: ModelConfig) -> nn.Module:
    """stack of Induced Set Attention Blocks"""
    return AttentionContext(
        [
            InducedSetAttentionBlock(
                config.d_model,
                config.heads,
                config.ffn_mult,
                config.inducing_points,
                config.dropout,
            )
            for _ in range(config.depth)
        ]
    )
