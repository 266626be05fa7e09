"""Small layers shared by several families."""

from __future__ import annotations

from functools import partial

from timm.layers import LayerNorm2d as _TimmLayerNorm2d

# timm's LayerNorm2d defaults to eps 1e-6; the official vision-Mamba models use PyTorch's 1e-5 everywhere.
LayerNorm2d = partial(_TimmLayerNorm2d, eps=1e-5)
