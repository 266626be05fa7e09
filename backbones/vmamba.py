"""VMamba: hierarchical vision backbone of VSS blocks (SS2D cross scan + MLP).

Variants follow the official releases (MzeroMiko/VMamba): the vanilla v0 model (d_state 16, z gate,
patch-4 stem, patch merging, no MLP) and the v2 models (d_state 1, no z gate, overlapping conv stem,
conv downsampling, MLP ratio 4). Blocks run on channels-last maps; stages take and return NCHW so that
features are ready for dense heads.

Layout differences from the official code, handled by ``tools/convert.py``: the official
``layers.i.downsample`` sits at the end of stage i, ours at the start of stage i + 1; the official
channel-first ``Linear2d``/``LayerNorm2d`` are plain ``nn.Linear``/``nn.LayerNorm`` here (same weights).
"""

from __future__ import annotations

from typing import Dict

from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn

from ._checkpoint import VMAMBA_KEY_RULES, KeyRules, rename_key, unwrap_state_dict, vmamba_generation, with_own_weights
from ._features import build_backbone, imagenet_cfg
from .hierarchical import HierarchicalMamba
from .layers import ConvDownsample, OverlapStem, PatchMerging, PatchStem, VSSBlock

__all__ = ["OFFICIAL_KEY_RULES", "checkpoint_filter_fn"]


# VMamba's official layout is the code base's (MSVMamba forks it), so its rules live in ``_checkpoint``.
OFFICIAL_KEY_RULES: Dict[str, KeyRules] = VMAMBA_KEY_RULES


def checkpoint_filter_fn(state_dict: Dict, model: nn.Module) -> Dict[str, Tensor]:
    """Convert an official VMamba checkpoint (the v0 release or the v2 releases) to this module's keys.

    No tensor changes shape. Of a checkpoint holding ``model`` and ``model_ema``, the ``model`` weights
    are used; pass ``checkpoint["model_ema"]`` for the EMA ones. A state dict in our layout passes through.
    The dense backbone's ``outnorm{i}`` become ``feature_norms.{i}``; a model with feature norms keeps its own
    where the file has none (a classifier checkpoint).
    """
    state_dict = unwrap_state_dict(state_dict)
    if not any(k.startswith("stem.") for k in state_dict):
        rules = OFFICIAL_KEY_RULES[vmamba_generation(state_dict)]
        state_dict = {rename_key(k, rules): v for k, v in state_dict.items()}
    return with_own_weights(state_dict, model, "feature_norms.")


def _create_vmamba(variant: str, pretrained: bool = False, **kwargs) -> HierarchicalMamba:
    """The hierarchical skeleton with VSS blocks; options other than the skeleton's go to ``VSSBlock`` and its
    ``SS2D`` (``d_state``, ``ssm_ratio``, ``dt_rank``, ``d_conv``, ``conv_bias``, ``gated``, ``mlp_ratio``,
    ``scan_backend``); ``features_only`` gets the dense backbone's per-level feature norms."""
    return build_backbone(HierarchicalMamba, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                          dense_feature_norms=True, block_layer=VSSBlock, **kwargs)


def _cfg(url: str = "", **kwargs) -> dict:
    return imagenet_cfg(url, **{"license": "mit", "paper_ids": "arXiv:2401.10166", **kwargs})


_RELEASES = "https://github.com/MzeroMiko/VMamba/releases/download/%23"
default_cfgs = generate_default_cfgs({
    "vanilla_vmamba_tiny.in1k": _cfg(_RELEASES + "v0cls/vssmtiny_dp01_ckpt_epoch_292.pth", first_conv="stem.proj"),
    "vmamba_tiny_s2l5.in1k": _cfg(_RELEASES + "v2cls/vssm_tiny_0230_ckpt_epoch_262.pth"),
    "vmamba_small_s2l15.in1k": _cfg(_RELEASES + "v2cls/vssm_small_0229_ckpt_epoch_222.pth"),
    "vmamba_base_s2l15.in1k": _cfg(_RELEASES + "v2cls/vssm_base_0229_ckpt_epoch_237.pth"),
    "vmamba_tiny_s1l8.in1k": _cfg(_RELEASES + "v2cls/vssm1_tiny_0230s_ckpt_epoch_264.pth"),
    "vmamba_femto.untrained": _cfg(input_size=(3, 64, 64), pool_size=(2, 2), license="apache-2.0"),
    "test_vmamba.untrained": _cfg(input_size=(3, 32, 32), pool_size=(1, 1), license="apache-2.0"),
})

# The released v2 models: no z gate, d_state 1, conv bias off, overlapping stem, conv downsampling.
_V2 = dict(d_state=1, gated=False, conv_bias=False, mlp_ratio=4.0, stem_layer=OverlapStem,
           downsample_layer=ConvDownsample)
# The vanilla (v0) model: z gate, d_state 16, patch-4 stem, patch merging, no MLP.
_V0 = dict(d_state=16, ssm_ratio=2.0, gated=True, conv_bias=True, mlp_ratio=0.0, stem_layer=PatchStem,
           downsample_layer=PatchMerging)


@register_model
def vanilla_vmamba_tiny(pretrained: bool = False, **kwargs) -> HierarchicalMamba:
    """Vanilla VMamba-T (v0 release): 22.89 M parameters, 82.2 % ImageNet top-1."""
    args = dict(_V0, depths=(2, 2, 9, 2), dims=96, drop_path_rate=0.2)
    return _create_vmamba("vanilla_vmamba_tiny", pretrained, **dict(args, **kwargs))


@register_model
def vmamba_tiny_s2l5(pretrained: bool = False, **kwargs) -> HierarchicalMamba:
    """VMamba-T[s2l5]: 30.71 M parameters, 82.5 % top-1."""
    args = dict(_V2, depths=(2, 2, 5, 2), dims=96, ssm_ratio=2.0, drop_path_rate=0.2)
    return _create_vmamba("vmamba_tiny_s2l5", pretrained, **dict(args, **kwargs))


@register_model
def vmamba_small_s2l15(pretrained: bool = False, **kwargs) -> HierarchicalMamba:
    """VMamba-S[s2l15]: 50.15 M parameters, 83.6 % top-1."""
    args = dict(_V2, depths=(2, 2, 15, 2), dims=96, ssm_ratio=2.0, drop_path_rate=0.3)
    return _create_vmamba("vmamba_small_s2l15", pretrained, **dict(args, **kwargs))


@register_model
def vmamba_base_s2l15(pretrained: bool = False, **kwargs) -> HierarchicalMamba:
    """VMamba-B[s2l15]: 88.56 M parameters, 83.9 % top-1."""
    args = dict(_V2, depths=(2, 2, 15, 2), dims=128, ssm_ratio=2.0, drop_path_rate=0.6)
    return _create_vmamba("vmamba_base_s2l15", pretrained, **dict(args, **kwargs))


@register_model
def vmamba_tiny_s1l8(pretrained: bool = False, **kwargs) -> HierarchicalMamba:
    """VMamba-T[s1l8], the headline VMamba-T: 30.25 M parameters, 82.6 % top-1."""
    args = dict(_V2, depths=(2, 2, 8, 2), dims=96, ssm_ratio=1.0, drop_path_rate=0.2)
    return _create_vmamba("vmamba_tiny_s1l8", pretrained, **dict(args, **kwargs))


@register_model
def vmamba_femto(pretrained: bool = False, **kwargs) -> HierarchicalMamba:
    """A small v2-style VMamba (not an official release) for CPU demos on small images."""
    args = dict(_V2, depths=(1, 1, 3, 1), dims=32, ssm_ratio=1.0, drop_path_rate=0.05)
    return _create_vmamba("vmamba_femto", pretrained, **dict(args, **kwargs))


@register_model
def test_vmamba(pretrained: bool = False, **kwargs) -> HierarchicalMamba:
    """Smallest VMamba for tests (timm's ``test_*`` convention)."""
    args = dict(_V2, depths=(1, 1, 1, 1), dims=8, ssm_ratio=1.0, drop_path_rate=0.0)
    return _create_vmamba("test_vmamba", pretrained, **dict(args, **kwargs))
