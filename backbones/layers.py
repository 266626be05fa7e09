"""Small layers shared by several families."""

from __future__ import annotations

from functools import partial

from timm.layers import LayerNorm2d as _TimmLayerNorm2d
from timm.layers import trunc_normal_
from torch import nn

# timm's LayerNorm2d defaults to eps 1e-6; the official vision-Mamba models use PyTorch's 1e-5 everywhere.
LayerNorm2d = partial(_TimmLayerNorm2d, eps=1e-5)


def init_linear_trunc_normal(module: nn.Module, std: float = 0.02) -> None:
    """The timm/official init of linear layers: truncated normal weights, zero biases (use with ``apply``)."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def flagged_no_weight_decay(model: nn.Module) -> set:
    """Names of the parameters flagged ``_no_weight_decay`` (the SSM's A_logs and Ds), for ``no_weight_decay()``."""
    return {name for name, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)}
