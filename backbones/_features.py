"""timm's intermediate-feature API, shared by every hierarchical (stem + stages + norm + head) backbone."""

from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
from timm.models._features import feature_take_indices
from torch import Tensor, nn


class HierarchicalFeaturesMixin:
    """``forward_intermediates``/``prune_intermediate_layers`` for models with ``stem``, ``stages``
    (NCHW in and out), a final ``norm`` and a ``head``; this is what ``features_only=True`` uses."""

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Run the stages and return the NCHW outputs of those in ``indices`` (all by default)."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[: max_index + 1]
        intermediates = []
        x = self.stem(x)
        for index, stage in enumerate(stages):
            x = stage(x)
            if index in take_indices:
                feature = self.norm(x) if norm and index == len(self.stages) - 1 else x
                intermediates.append(feature.permute(0, 2, 3, 1) if output_fmt == "NHWC" else feature)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last requested feature (and the norm/head when asked)."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        if max_index < len(self.stages) - 1:
            self.stages = self.stages[: max_index + 1]
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            prune_norm = True
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices
