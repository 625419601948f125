"""Model registry for lead identification: encoders and contexts are built by name.

Like timm, each building block registers a builder function under a short name
(``@register_encoder("inception_gru")``); a :class:`ModelConfig` names one encoder and one context
and :func:`trainables.lead_id.models.create_model` assembles them. This module imports no torch, so a
search space or the CLI can validate a configuration cheaply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

# A builder takes the whole model configuration and returns the module; each block reads the
# fields it needs (an encoder d_model, a context d_model/depth/heads/...).
ModuleBuilder = Callable[["ModelConfig"], "nn.Module"]

ENCODERS: dict[str, ModuleBuilder] = {}
CONTEXTS: dict[str, ModuleBuilder] = {}

# The names the built-in modules (encoders, context: imported with the model by lead_identifier)
# register, so that checking a configuration that names a built-in block imports no torch (a
# search's driver checks every trial's configuration and never builds a model).
# tests/test_models.py holds these equal to what the modules register.
BUILTIN_ENCODERS = ("cnn", "inception", "gru", "cnn_gru", "inception_gru")
BUILTIN_CONTEXTS = ("none", "deepsets", "sab", "isab")


def register_encoder(name: str) -> Callable[[ModuleBuilder], ModuleBuilder]:
    """Register a per-lead encoder builder: ``(N, 1, T) -> (N, d_model)``."""
    return _register(ENCODERS, "encoder", name)


def register_context(name: str) -> Callable[[ModuleBuilder], ModuleBuilder]:
    """Register a context builder: ``(B, K, D)`` features and a ``(B, K)`` lead mask -> ``(B, K, D)``."""
    return _register(CONTEXTS, "context", name)


def _register(
    table: dict[str, ModuleBuilder], kind: str, name: str
) -> Callable[[ModuleBuilder], ModuleBuilder]:
    def decorator(builder: ModuleBuilder) -> ModuleBuilder:
        if name in table:
            raise ValueError(f"an {kind} named {name!r} is already registered; pick another name")
        table[name] = builder
        return builder

    return decorator


@dataclass(frozen=True)
class ModelConfig:
    """One lead-identification model. Defaults are the reference paper's model (docs/lead-id.md)."""

    encoder: str = "inception_gru"
    context: str = "sab"
    d_model: int = 128  # per-lead feature width D
    depth: int = 5  # attention blocks in the context (sab, isab)
    heads: int = 8  # attention heads (sab, isab); must divide d_model
    ffn_mult: int = 4  # feed-forward width of an attention block, as a multiple of d_model
    inducing_points: int = 16  # isab only
    n_classes: int = 12  # lead labels M
    dropout: float = 0.0  # in the context blocks and between the head's layers
    width: float = 1.0  # encoder channel / GRU-hidden multiplier; 1.0 = the paper's sizes

    def validate(self) -> ModelConfig:
        """Raise ValueError with a one-line message if the configuration cannot be built."""
        for kind, name, known in (
            ("encoder", self.encoder, {*ENCODERS, *BUILTIN_ENCODERS}),
            ("context", self.context, {*CONTEXTS, *BUILTIN_CONTEXTS}),
        ):
            if name not in known:
                raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(sorted(known))}")
        for name in ("d_model", "depth", "heads", "ffn_mult", "inducing_points"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model {name} must be an integer >= 1, got {value!r}")
        if self.d_model % self.heads:
            raise ValueError(
                f"model heads={self.heads} does not divide d_model={self.d_model}; "
                "choose d_model as a multiple of heads"
            )
        if not isinstance(self.n_classes, int) or self.n_classes < 2:
            raise ValueError(f"model n_classes must be an integer >= 2, got {self.n_classes!r}")
        if not (isinstance(self.width, (int, float)) and 0.0 < self.width <= 8.0):
            raise ValueError(f"model width must be in (0, 8], got {self.width!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model dropout must be in [0, 1), got {self.dropout!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}
