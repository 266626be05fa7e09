"""timm plumbing shared by every hierarchical (stem + stages + norm + head) backbone family:
the intermediate-feature API, the ImageNet pretrained-cfg defaults and the model builder."""

from __future__ import annotations

from typing import Any, List, Optional, Tuple, Union

import torch
from timm.models import build_model_with_cfg
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from ._checkpoint import require_local_weights


class HierarchicalFeaturesMixin:
    """``forward_intermediates``/``prune_intermediate_layers`` for models with ``stem``, ``stages``
    (NCHW in and out), a final ``norm`` and a ``head``; this is what ``features_only=True`` uses.

    A model may also have ``feature_norms``, one norm per stage applied to that stage's output: the official
    dense backbones of VMamba, MSVMamba and EfficientVMamba (``outnorm{i}``) normalise every level they return.
    """

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
                if getattr(self, "feature_norms", None) is not None:
                    feature = self.feature_norms[index](x)
                else:
                    feature = self.norm(x) if norm and index == len(self.stages) - 1 else x
                intermediates.append(feature.permute(0, 2, 3, 1) if output_fmt == "NHWC" else feature)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last requested feature (and the norm/head when asked), and the feature
        norms of levels not requested (as the official dense backbones have only those of ``out_indices``)."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        if getattr(self, "feature_norms", None) is not None:
            for index in set(range(len(self.feature_norms))) - set(take_indices):
                self.feature_norms[index] = nn.Identity()
        if max_index < len(self.stages) - 1:
            self.stages = self.stages[: max_index + 1]
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            prune_norm = True
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


def imagenet_cfg(url: str = "", **kwargs: Any) -> dict:
    """A timm pretrained cfg for ImageNet-1K classifiers at 224 (bicubic, crop 0.875); ``kwargs`` override."""
    return {
        "url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "first_conv": "stem.conv1", "classifier": "head", **kwargs,
    }


def create_hierarchical(model_cls: type, variant: str, pretrained: bool = False, dense_feature_norms: bool = False,
                        **kwargs: Any) -> nn.Module:
    """``build_model_with_cfg`` with 4-stage ``features_only`` support through ``forward_intermediates``;
    with ``dense_feature_norms`` a ``features_only`` model gets per-level ``feature_norms`` (unless told)."""
    require_local_weights(variant, pretrained, kwargs)
    if dense_feature_norms:
        kwargs.setdefault("feature_norms", bool(kwargs.get("features_only")))
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(model_cls, variant, pretrained,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)
