"""OpenMMLab integration: importing this module registers ``MambaLabBackbone`` with mmdet and mmseg.

Use it from any mmdet 3.x / mmseg 1.x config (optional extra ``mm``; see ``docs/mm/README.md``)::

    custom_imports = dict(imports=["backbones.mm"], allow_failed_imports=False)
    model = dict(backbone=dict(_delete_=True, type="MambaLabBackbone", name="vmamba_tiny_s1l8",
                               drop_path_rate=0.2, out_indices=(0, 1, 2, 3)))

The backbone is ``backbones.create_backbone(name, features_only=True, ...)`` wrapped in an mmengine
``BaseModule``; it returns the tuple of NCHW maps mmdet's necks and mmseg's heads expect (strides 4-32).
Every other keyword goes to the model constructor (``drop_path_rate``, ``scan_backend``, ``in_chans``, ...);
ImageNet weights load as in the rest of mambalab, with ``pretrained=True,
pretrained_cfg_overlay=dict(file=<converted .safetensors>)``.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Optional, Sequence

from torch import Tensor

from . import create_backbone

try:
    from mmengine.model import BaseModule
except ImportError as err:  # an optional extra: say how to get it
    raise ImportError("backbones.mm needs mmengine with mmdet and/or mmsegmentation (pip install "
                      "'mambalab[mm]' plus a compiled mmcv 2.1; see docs/mm/README.md)") from err


class MambaLabBackbone(BaseModule):
    """Any mambalab backbone as an OpenMMLab backbone returning a tuple of multi-scale feature maps.

    Args:
        name: a registered backbone (``backbones.list_backbones()``).
        out_indices: feature levels returned, finest first.
        init_cfg: mmengine initialisation config (the backbone has its own init; pretrained weights come
            through ``pretrained``/``pretrained_cfg_overlay`` in ``kwargs``).
        kwargs: passed to the backbone constructor.
    """

    def __init__(self, name: str, out_indices: Sequence[int] = (0, 1, 2, 3), init_cfg: Optional[dict] = None,
                 **kwargs) -> None:
        super().__init__(init_cfg=init_cfg)
        self.body = create_backbone(name, features_only=True, out_indices=tuple(out_indices), **kwargs)
        self.out_channels = self.body.feature_info.channels()
        self.strides = self.body.feature_info.reduction()

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        # NCHW-contiguous, as the official backbones return them: the channel-first families' maps come out of
        # LayerNorm2d channels-last in memory, and mmcv's CPU RoIAlign reads such a tensor as if it were NCHW.
        return tuple(feature.contiguous() for feature in self.body(x))


def register() -> list[str]:
    """Register ``MambaLabBackbone`` in every importable OpenMMLab ``MODELS`` registry; return their scopes."""
    scopes = []
    for scope in ("mmdet", "mmseg"):
        if importlib.util.find_spec(scope) is None:  # not installed; an installed but broken one raises below
            continue
        registry = importlib.import_module(f"{scope}.registry").MODELS
        registry.register_module(name="MambaLabBackbone", module=MambaLabBackbone, force=True)
        scopes.append(scope)
    if not scopes:
        raise ImportError("backbones.mm: neither mmdet nor mmseg can be imported; install the 'mm' extra "
                          "(see docs/mm/README.md)")
    return scopes


REGISTERED_IN = register()
