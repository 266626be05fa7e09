"""Vision Mamba backbones on one selective-scan core.

Importing this package registers every variant with timm, so ``timm.create_model(name)`` works for
all of them; ``create_backbone`` is the same with a clear error for unknown names. It also registers
``FX_LEAF_MODULES`` / ``FX_LEAF_FUNCTIONS`` with timm, what torch.fx tracing keeps as single calls.
``require_local_weights`` is the check every build makes for ``pretrained=True`` (converted weights on disk,
nothing downloaded), for callers that check a config before building.
"""

from __future__ import annotations

from types import ModuleType

import timm
from torch import nn

from . import efficientvmamba, groupmamba, hrvmamba, mhs, msvmamba, vim, vmamba
from ._checkpoint import require_local_weights
from ._fx import FX_LEAF_FUNCTIONS, FX_LEAF_MODULES
from .ssm import selective_scan

__all__ = ["FX_LEAF_FUNCTIONS", "FX_LEAF_MODULES", "block_classes", "create_backbone", "family_of", "list_backbones",
           "require_local_weights", "selective_scan"]

_FAMILY_MODULES = (vmamba, msvmamba, efficientvmamba, groupmamba, hrvmamba, vim, mhs)


def list_backbones() -> list[str]:
    """Names of every backbone this package registers (also their ``conf/backbone`` names)."""
    families = (module.__name__.rsplit(".", 1)[-1] for module in _FAMILY_MODULES)
    return sorted(name for family in families for name in timm.list_models(module=family))


def family_of(name: str) -> ModuleType:
    """The family module that registers ``name`` (its ``checkpoint_filter_fn`` knows the official layout)."""
    for module in _FAMILY_MODULES:
        if name in timm.list_models(module=module.__name__.rsplit(".", 1)[-1]):
            return module
    raise ValueError(f"unknown backbone {name!r}; available backbones: {', '.join(list_backbones())}")


def block_classes() -> list[type[nn.Module]]:
    """The residual block classes of every family (units for FSDP wrapping and activation checkpointing)."""
    return sorted({obj for module in _FAMILY_MODULES for obj in vars(module).values()
                   if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__name__.endswith("Block")},
                  key=lambda cls: cls.__qualname__)


def create_backbone(name: str, **kwargs) -> nn.Module:
    """Build a registered backbone by name; unknown names list the valid choices."""
    names = list_backbones()
    if name not in names:
        raise ValueError(f"unknown backbone {name!r}; available backbones: {', '.join(names)}")
    return timm.create_model(name, **kwargs)
