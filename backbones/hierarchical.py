"""The hierarchical skeleton: stem -> four stages (NCHW between them) -> LayerNorm -> pooled linear head.

VMamba, MSVMamba and EfficientVMamba are this model with their own stem, downsampling and blocks, passed
in as callables by each family's register functions; a state dict therefore reads ``stem.*``,
``stages.{i}.downsample.*``, ``stages.{i}.blocks.{j}.*``, ``norm.*`` and ``head.*`` for all three.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence, Union

import torch
from torch import Tensor, nn

from ._features import MambaBackbone
from .layers import (
    BlockLayer,
    ChannelsLastStage,
    LayerNorm2d,
    PatchMerging,
    PatchStem,
    StageLayer,
    VSSBlock,
    build_stages,
    init_linear_trunc_normal,
)

__all__ = ["HierarchicalMamba"]


class HierarchicalMamba(MambaBackbone):
    """A four-stage vision-Mamba classifier / backbone built from callables (timm model API).

    Args:
        in_chans: input image channels.
        num_classes: classifier outputs; 0 gives pooled features.
        depths: blocks per stage.
        dims: channels per stage, or the first stage's (doubled per stage).
        block_layer: ``(dim, drop_path=rate, **block_kwargs) -> block``, or one such callable per stage.
        stage_layer: ``(dim, downsample, blocks) -> stage`` taking and returning NCHW maps, or one per stage.
        stem_layer: ``(in_chans, dim) -> module`` for the stride-4 stem.
        downsample_layer: ``(dim, out_dim) -> module`` between stages.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, increasing linearly over all blocks.
        global_pool: "avg" or "" (no pooling).
        feature_norms: a LayerNorm on each stage's output in ``forward_intermediates`` (``features_only``), as
            the official dense backbones' ``outnorm{i}`` (the families set it for ``features_only``).
        **block_kwargs: passed to every block (the family's block options, e.g. VSSBlock's ``d_state``).
    """

    has_stage_inputs = True

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, depths: Sequence[int] = (2, 2, 9, 2),
                 dims: Union[int, Sequence[int]] = 96, block_layer: Union[BlockLayer, Sequence[BlockLayer]] = VSSBlock,
                 stage_layer: Union[StageLayer, Sequence[StageLayer]] = ChannelsLastStage,
                 stem_layer: Callable[[int, int], nn.Module] = PatchStem,
                 downsample_layer: Callable[[int, int], nn.Module] = PatchMerging, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, global_pool: str = "avg", feature_norms: bool = False,
                 **block_kwargs: Any) -> None:
        super().__init__()
        self.in_chans = in_chans
        if isinstance(dims, int):
            dims = [dims * 2 ** i for i in range(len(depths))]
        self.stem = stem_layer(in_chans, dims[0])
        block_layers = block_layer if isinstance(block_layer, (list, tuple)) else [block_layer] * len(depths)
        self.stages, self.feature_info = build_stages(
            depths, dims, [partial(layer, **block_kwargs) for layer in block_layers], stage_layer, downsample_layer,
            drop_path_rate)
        self._init_feature_norms(dims if feature_norms else None)
        self.norm = LayerNorm2d(dims[-1])
        self._init_classifier(dims[-1], num_classes, drop_rate, global_pool)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Truncated-normal linear layers as the official models; SSM parameters keep Mamba's init."""
        init_linear_trunc_normal(module)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None), (r"^norm", (99999,))])

    def _finish_features(self, state: Tensor) -> Tensor:
        return self.norm(state)

    def _norm_level(self, feature: Tensor) -> Tensor:
        return self.norm(feature)
