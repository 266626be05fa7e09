"""Classification head on pooled backbone features."""

from __future__ import annotations

from torch import Tensor, nn

from .interface import HeadInputs


class LinearClassifier(nn.Module):
    """Dropout then a linear layer, on the pooled features from ``forward_head(pre_logits=True)``.

    Args:
        in_features: width of the pooled features (the backbone's ``num_features``).
        num_classes: number of output classes.
        drop_rate: dropout before the linear layer.
    """

    inputs = HeadInputs.POOLED

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: Tensor) -> Tensor:
        return self.fc(self.drop(features))
