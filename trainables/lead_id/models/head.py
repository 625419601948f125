"""Per-lead classification head: context features of one lead -> logits over the lead labels."""

from __future__ import annotations

from torch import Tensor, nn

HEAD_HIDDEN = (256, 128)


class LeadClassifierHead(nn.Module):
    """Linear(D -> 256) + ReLU, Linear(256 -> 128) + ReLU, Linear(128 -> M), applied to each lead.

    Dropout (if any) follows each hidden ReLU.
    """

    def __init__(self, d_model: int, n_classes: int, dropout: float = 0.0) -> None:
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
        """``(..., D) -> (..., M)``."""
        return self.layers(features)
