"""The timm model surface every family shares, written once: classifier head and its reset, intermediate
features and their pruning (what ``features_only=True`` uses), gradient checkpointing and weight-decay
names; plus the ImageNet pretrained-cfg defaults and the model builder."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from timm.layers import get_device_dtype
from timm.models import build_model_with_cfg
from timm.models._features import FeatureGetterNet, feature_take_indices
from torch import Tensor, nn

from ._checkpoint import require_local_weights
from .layers import LayerNorm2d, flagged_no_weight_decay


class MambaBackbone(nn.Module):
    """Base class of every family's model: timm's model API, written once on top of a few family hooks.

    A family sets ``feature_info`` (one entry per feature level, finest first) and calls
    ``_init_classifier`` where its classifier sits in the parameter order. The feature hooks default to the
    staged layout (``stem``, then ``stages`` whose outputs are the levels; VMamba, MSVMamba,
    EfficientVMamba, GroupMamba): ``_forward_levels`` (run the model, collect level maps),
    ``_finish_features`` (what ``forward_features`` adds after the last level), ``_norm_level`` (what
    ``norm=True`` does to the last level) and ``_prune_levels`` (what pruning removes). Classifier
    hooks: ``_pool`` (how ``global_pool`` reduces the features), ``_reset_heads`` and ``_prune_head``.
    A family whose dense backbone normalises every level it returns (the official ``outnorm{i}``) builds
    per-level ``feature_norms`` with ``_init_feature_norms``; ``forward_intermediates`` applies them.

    Class attributes: ``global_pools``, the ``global_pool`` values ``_pool`` knows; ``final_norm``, the
    attribute that ``prune_norm`` replaces with ``nn.Identity`` (None when there is no final norm);
    ``level_modules``, whether timm's module-based feature extractors can read the levels (a model with
    feature norms sets it to False for itself: its levels are the norms' outputs, which ``forward`` never
    computes); ``has_stage_inputs``, whether the levels are ``stages`` entries' outputs (``Stage``: downsample,
    then ``forward_downsampled``), so that ``forward_intermediates(stage_inputs=True)`` can also return each
    level's stage input, the map entering its blocks (VM-UNet's skips; ``build_backbone(stage_inputs=True)``).
    """

    global_pools: Tuple[str, ...] = ("avg", "")
    final_norm: Optional[str] = "norm"
    # Whether each feature level is the output of its ``feature_info`` module in ``forward``, which timm's
    # hook and FX feature extractors read (``features_only`` with ``feature_cls`` other than "getter").
    level_modules: bool = True
    # Whether the staged ``_forward_levels`` below computes the levels (the staged skeletons set it).
    has_stage_inputs: bool = False

    def _init_classifier(self, num_features: int, num_classes: int, drop_rate: float = 0.0,
                         global_pool: str = "avg") -> None:
        """Classifier attributes, dropout and head(s) of ``num_features`` inputs (call where they belong)."""
        self.num_classes = num_classes
        self.global_pool = self._checked_pool(global_pool)
        self.num_features = self.head_hidden_size = num_features
        self.drop_rate = drop_rate
        self.head_drop = nn.Dropout(drop_rate)
        self._reset_heads(num_classes)

    def _init_feature_norms(self, widths: Optional[Sequence[int]]) -> None:
        """One LayerNorm per feature level of ``widths`` channels (None: no feature norms), applied to the maps
        ``forward_intermediates`` (so ``features_only``) returns, as the official dense backbones' ``outnorm{i}``."""
        self.feature_norms = nn.ModuleList(LayerNorm2d(width) for width in widths) if widths else None
        if self.feature_norms is not None:
            self.level_modules = False

    def _checked_pool(self, global_pool: str) -> str:
        if global_pool not in self.global_pools:
            choices = ", ".join(repr(pool) for pool in self.global_pools[:-1]) + f" or {self.global_pools[-1]!r}"
            raise ValueError(f"{type(self).__name__}: global_pool must be {choices}, got {global_pool!r}")
        return global_pool

    def _linear_head(self, num_classes: int) -> nn.Module:
        """A classifier on the model's device and dtype, in its training mode (also when reset later)."""
        head = nn.Linear(self.num_features, num_classes, **get_device_dtype(self)) if num_classes > 0 else nn.Identity()
        return head.train(self.training)

    def _reset_heads(self, num_classes: int) -> None:
        self.head = self._linear_head(num_classes)

    @torch.jit.ignore
    def get_classifier(self) -> Union[nn.Module, Tuple[nn.Module, ...]]:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = self._checked_pool(global_pool)
        self._reset_heads(num_classes)

    def _pool(self, x: Tensor) -> Tensor:
        """``forward_features``'s (B, C, H, W) map -> (B, C) with "avg"; unchanged with ""."""
        return x.mean(dim=(2, 3)) if self.global_pool == "avg" else x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_drop(self._pool(x))
        return x if pre_logits else self.head(x)

    def forward_features(self, x: Tensor) -> Tensor:
        return self._finish_features(self._forward_levels(x, [], stop_early=False)[0])

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Names of the SSM's A_logs and Ds, which the official recipes keep out of weight decay."""
        return flagged_no_weight_decay(self)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every unit that offers it (stages, HRVMamba's modules, Vim's block loop)."""
        for module in self.modules():
            if hasattr(module, "grad_checkpointing"):
                module.grad_checkpointing = enable

    def _forward_levels(self, x: Tensor, indices: List[int], stop_early: bool,
                        stage_inputs: bool = False) -> Tuple[Any, List[Tensor]]:
        """The model's state after its last level (for ``_finish_features``) and the NCHW maps of the levels
        ``indices`` (increasing), followed with ``stage_inputs`` by the same levels' stage inputs (each stage's
        ``downsample`` output); with ``stop_early`` the model may stop after the last of them."""
        stages = self.stages[: indices[-1] + 1] if stop_early else self.stages
        maps, inputs = [], []
        x = self.stem(x)
        for index, stage in enumerate(stages):
            if stage_inputs:
                x = stage.downsample(x)
                if index in indices:
                    inputs.append(x)
                x = stage.forward_downsampled(x)
            else:
                x = stage(x)
            if index in indices:
                maps.append(x)
        return x, maps + inputs

    def _finish_features(self, state: Any) -> Tensor:
        """``forward_features``'s output from the state ``_forward_levels`` ends in."""
        return state

    def _norm_level(self, feature: Tensor) -> Tensor:
        """The last level's map as ``forward_intermediates(norm=True)`` returns it."""
        return feature

    def _prune_levels(self, indices: List[int], prune_head: bool) -> bool:
        """Remove what only computes levels other than ``indices`` (the kept ones, increasing; with
        ``prune_head`` also what only the head needed) and trim ``feature_info`` after the last of them;
        True when the final norm and head no longer fit."""
        index = indices[-1]
        if index == len(self.stages) - 1:
            return False
        self.stages = self.stages[: index + 1]
        self.feature_info = self.feature_info[: index + 1]
        self.num_features = self.head_hidden_size = self.feature_info[index]["num_chs"]
        return True

    def _prune_head(self) -> None:
        self.reset_classifier(0, "")

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False,
                              stage_inputs: bool = False) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """The maps of the feature levels in ``indices`` (all by default), finest first, and
        ``forward_features``'s output (of the part that ran, with ``stop_early``).

        With ``stage_inputs`` (staged families, ``has_stage_inputs``) the level maps are followed by the same
        levels' stage inputs, as they enter the stages' blocks (after ``downsample``; level 0's is the stem's
        output): the same channels and strides, and no norm (``feature_norms`` and ``norm`` act on the levels).
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        if stage_inputs and not self.has_stage_inputs:
            raise ValueError(f"{type(self).__name__} has no stage inputs (stage_inputs=True): its feature levels are "
                             f"not the outputs of downsample-then-blocks stages")
        take_indices, _ = feature_take_indices(len(self.feature_info), indices)
        levels = sorted(set(take_indices))
        stop_early = stop_early and not torch.jit.is_scripting()
        if stage_inputs:
            state, maps = self._forward_levels(x, levels, stop_early, stage_inputs=True)
            maps, inputs = maps[: len(levels)], maps[len(levels):]
        else:
            (state, maps), inputs = self._forward_levels(x, levels, stop_early), []
        last = len(self.feature_info) - 1
        feature_norms = getattr(self, "feature_norms", None)
        intermediates = []
        for index, feature in zip(levels, maps):
            if feature_norms is not None:
                feature = feature_norms[index](feature)
            elif norm and index == last:
                feature = self._norm_level(feature)
            intermediates.append(feature)
        intermediates += inputs
        if output_fmt == "NHWC":
            intermediates = [feature.permute(0, 2, 3, 1) for feature in intermediates]
        return intermediates if intermediates_only else (self._finish_features(state), intermediates)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop what comes after the last requested level where the family can, the feature norms of the
        levels not requested (the official dense backbones have only those of their ``out_indices``), and the
        final norm and head when asked or when they no longer fit."""
        take_indices, _ = feature_take_indices(len(self.feature_info), indices)
        feature_norms = getattr(self, "feature_norms", None)
        if feature_norms is not None:
            for index in set(range(len(feature_norms))) - set(take_indices):
                feature_norms[index] = nn.Identity()
        if self._prune_levels(sorted(set(take_indices)), prune_head):
            prune_norm = prune_head = True
        if prune_norm and self.final_norm is not None:
            setattr(self, self.final_norm, nn.Identity())
        if prune_head:
            self._prune_head()
        return take_indices


class StageInputFeatures(FeatureGetterNet):
    """timm's ``features_only`` wrapper (``feature_cls="getter"``) whose output is the levels' maps followed by
    their stage inputs (``forward_intermediates(stage_inputs=True)``): what ``build_backbone(stage_inputs=True)``
    builds for heads that read ``HeadInputs.FEATURES_AND_STAGE_INPUTS``."""

    def forward(self, x: Tensor) -> List[Tensor]:
        return self.model.forward_intermediates(x, indices=self.out_indices, norm=self.norm,
                                                output_fmt=self.output_fmt, intermediates_only=True,
                                                stage_inputs=True)


def imagenet_cfg(url: str = "", **kwargs: Any) -> dict:
    """A timm pretrained cfg for ImageNet-1K classifiers at 224 (bicubic, crop 0.875); ``kwargs`` override."""
    return {
        "url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "first_conv": "stem.conv1", "classifier": "head", **kwargs,
    }


@contextmanager
def factory_defaults(device: Optional[Union[str, torch.device]] = None,
                     dtype: Optional[torch.dtype] = None) -> Iterator[None]:
    """Create tensors on ``device`` and floating-point tensors in ``dtype`` inside the block (None keeps
    PyTorch's defaults). ``dtype`` is set with ``torch.set_default_dtype``, which is process-wide: build
    models with different dtypes from one thread at a time."""
    previous_dtype = torch.get_default_dtype()
    with torch.device(device) if device is not None else nullcontext():
        if dtype is not None:
            torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(previous_dtype)


def build_backbone(model_cls: type, variant: str, pretrained: bool = False,
                   device: Optional[Union[str, torch.device]] = None, dtype: Optional[torch.dtype] = None,
                   dense_feature_norms: bool = False, stage_inputs: bool = False, **kwargs: Any) -> nn.Module:
    """``build_model_with_cfg`` with ``features_only`` served by ``forward_intermediates`` (four levels
    unless ``out_indices`` says otherwise).

    ``device`` and ``dtype`` (which ``timm.create_model`` passes on) are where and in which floating-point
    type the parameters and buffers are created: ``device="meta"`` builds the structure without allocating
    memory, ``device="cuda"`` initialises directly on the GPU. Pretrained weights load after construction,
    from converted weights on disk only (``require_local_weights``: nothing is downloaded). With
    ``dense_feature_norms`` (families whose official dense backbones normalise every level), a
    ``features_only`` model gets per-level ``feature_norms`` unless the caller says otherwise. With
    ``stage_inputs`` (``features_only`` of a staged family), the output is the levels' maps followed by their
    stage inputs (``StageInputFeatures``).
    """
    require_local_weights(variant, pretrained, kwargs)
    if dense_feature_norms:
        kwargs.setdefault("feature_norms", bool(kwargs.get("features_only")))
    feature_cfg = {"out_indices": kwargs.pop("out_indices", (0, 1, 2, 3)), "feature_cls": "getter",
                   **kwargs.pop("feature_cfg", {})}
    feature_cls = kwargs.get("feature_cls", feature_cfg["feature_cls"])
    module_extractor = kwargs.get("features_only") and feature_cls not in ("getter", FeatureGetterNet)
    if stage_inputs:
        if not kwargs.get("features_only") or module_extractor:
            raise ValueError(f"{variant}: stage_inputs=True needs features_only=True with feature_cls='getter', "
                             f"got features_only={kwargs.get('features_only')!r}, feature_cls={feature_cls!r}")
        kwargs.pop("feature_cls", None)
        feature_cfg["feature_cls"] = StageInputFeatures

    def construct(**model_kwargs: Any) -> nn.Module:
        with factory_defaults(device, dtype):
            model = model_cls(**model_kwargs)
        if stage_inputs and not model.has_stage_inputs:
            raise ValueError(f"{variant}: stage_inputs=True needs a staged backbone (VMamba, MSVMamba, "
                             f"EfficientVMamba, GroupMamba, MHS-VM), whose levels are downsample-then-blocks "
                             f"stages; {type(model).__name__}'s are not")
        if module_extractor and not model.level_modules:
            hint = (" (each level goes through its feature_norms outside forward; VMamba, MSVMamba and "
                    "EfficientVMamba without them, feature_norms=False, give the stages' outputs)"
                    if getattr(model, "feature_norms", None) is not None else "")
            raise ValueError(f"{variant}: features_only supports feature_cls='getter' only, got {feature_cls!r}: its "
                             f"feature levels are not outputs of modules, which timm's hook and FX extractors "
                             f"read{hint}")
        return model

    return build_model_with_cfg(construct, variant, pretrained, feature_cfg=feature_cfg, **kwargs)
