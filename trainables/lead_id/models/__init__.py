"""Lead-identification models, built by name: ``create_model(encoder="inception_gru", ...)``.

Importing this package is cheap: torch and the model modules load on first use of one of the
names below, so ``leadtune --help`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from leadtune.trainables.lead_id.models.lead_identifier import (
        LeadIdentifier,
        count_parameters,
        create_model,
        describe_models,
    )
    from leadtune.trainables.lead_id.models.registry import (
        CONTEXTS,
        ENCODERS,
        ModelConfig,
        register_context,
        register_encoder,
    )

_EXPORTS = {
    "CONTEXTS": "registry",
    "ENCODERS": "registry",
    "ModelConfig": "registry",
    "register_context": "registry",
    "register_encoder": "registry",
    "LeadIdentifier": "lead_identifier",
    "count_parameters": "lead_identifier",
    "create_model": "lead_identifier",
    "describe_models": "lead_identifier",
}

__all__ = [
    "CONTEXTS",
    "ENCODERS",
    "LeadIdentifier",
    "ModelConfig",
    "count_parameters",
    "create_model",
    "describe_models",
    "register_context",
    "register_encoder",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # Loading lead_identifier also imports the encoders and contexts, so the registries that
    # come back are filled with the built-in blocks.
    from leadtune.trainables.lead_id.models import lead_identifier, registry

    return getattr(lead_identifier if _EXPORTS[name] == "lead_identifier" else registry, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
