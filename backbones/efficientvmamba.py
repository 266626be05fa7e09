"""EfficientVMamba: atrous scan + conv branch early, inverted residuals late (TerryPei/EfficientVMamba).

The first two stages (high resolution, where short routes save the most) use EVSS blocks: an SS2D
whose four routes are the four 2x2 sub-grids of the map (``AtrousScan``, ES2D), so each route is a
quarter as long as a cross-scan route, plus a parallel depthwise-conv branch; ONE channel-attention
module (``BiAttn``, shared weights) gates both branches before they are added. The last two stages
are MobileNetV2 inverted residuals with squeeze-excite.

Key layout: ``OFFICIAL_KEY_RULES`` and ``checkpoint_filter_fn`` turn the released checkpoints into this
module's names (official stage i ends with its downsample, ours starts stage i + 1 with it).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict

import torch
from timm.layers import DropPath
from timm.models import generate_default_cfgs, register_model
from timm.models._efficientnet_blocks import InvertedResidual, SqueezeExcite
from torch import Tensor, nn

from ._checkpoint import KeyRules, rename_key, unwrap_state_dict, with_own_weights
from ._features import build_backbone, imagenet_cfg
from .hierarchical import HierarchicalMamba
from .layers import ChannelsLastStage, Stage
from .scan_patterns import AtrousScan
from .ss2d import SS2D

__all__ = ["BiAttn", "EVSSBlock", "OFFICIAL_KEY_RULES", "checkpoint_filter_fn", "inverted_residual",
           "rename_official_key"]


class BiAttn(nn.Module):
    """Channel attention on channels-last maps: LayerNorm -> spatial mean -> fc -> GELU -> fc -> sigmoid.

    The gate is computed from the normalised input and scales the un-normalised input.
    """

    def __init__(self, channels: int, ratio: float = 0.125) -> None:
        super().__init__()
        hidden = int(channels * ratio)
        self.norm = nn.LayerNorm(channels)
        self.global_reduce = nn.Linear(channels, hidden)
        self.act = nn.GELU()
        self.channel_select = nn.Linear(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.norm(x).mean(dim=(1, 2), keepdim=True)
        return x * torch.sigmoid(self.channel_select(self.act(self.global_reduce(pooled))))


class EVSSBlock(nn.Module):
    """x + DropPath(attn(ES2D(n)) + attn(conv_branch(n))) with n = norm1(x) and ONE shared ``attn``.

    The SSM branch gives global context from a sparse (atrous) scan; the conv branch
    (depthwise 3x3 -> BatchNorm -> GELU -> 1x1) restores the local detail that skipping pixels loses.

    Args:
        dim: channels.
        drop_path: stochastic-depth rate of the residual branch.
        norm_layer: channels-last normalisation.
        **ssm_kwargs: passed to ``SS2D`` (whose scan pattern is ``AtrousScan``).
    """

    def __init__(self, dim: int, drop_path: float = 0.0, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
                 **ssm_kwargs) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.mixer = SS2D(dim, pattern=AtrousScan(), **ssm_kwargs)
        self.conv_branch = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1, groups=dim), nn.BatchNorm2d(dim), nn.GELU(), nn.Conv2d(dim, dim, 1))
        self.attn = BiAttn(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """(batch, height, width, dim) -> same shape."""
        normed = self.norm1(x)
        local = self.conv_branch(normed.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.drop_path(self.attn(self.mixer(normed)) + self.attn(local))


def inverted_residual(dim: int, drop_path: float = 0.0, expand_ratio: float = 4.0,
                      se_ratio: float = 0.125) -> nn.Module:
    """The late stages' block: timm's MobileNetV2 inverted residual (ReLU) with squeeze-excite, whose
    reduction ``se_ratio`` is relative to the expanded width."""
    return InvertedResidual(dim, dim, exp_ratio=expand_ratio, act_layer=nn.ReLU,
                            se_layer=partial(SqueezeExcite, rd_ratio=se_ratio), drop_path_rate=drop_path)


# Official key -> ours, applied in order with ``re.sub`` (a replacement may be a function of the match).
# Official EVSS stages are ``layers.i.{blocks,downsample}``; the inverted-residual stages are flat
# sequences ``layers.i.{0: permute, 1..depth: blocks, depth + 1: permute, depth + 2: downsample}``.
OFFICIAL_KEY_RULES: KeyRules = [
    (r"^patch_embed\.0\.", "stem.proj."),
    (r"^patch_embed\.2\.", "stem.norm."),
    (r"^layers\.(\d+)\.downsample\.", lambda m: f"stages.{int(m[1]) + 1}.downsample."),
    (r"^layers\.(\d+)\.\d+\.(reduction|norm)\.", lambda m: f"stages.{int(m[1]) + 1}.downsample.{m[2]}."),
    (r"^layers\.(\d+)\.(\d+)\.(?=conv_pw|conv_dw|se\.)", lambda m: f"stages.{m[1]}.blocks.{int(m[2]) - 1}."),
    (r"\.conv_pw\.0\.", ".conv_pw."),
    (r"\.conv_pw\.1\.", ".bn1."),
    (r"\.conv_dw\.0\.", ".conv_dw."),
    (r"\.conv_dw\.1\.", ".bn2."),
    (r"\.conv_pw2\.0\.", ".conv_pwl."),
    (r"\.conv_pw2\.1\.", ".bn3."),
    (r"^layers\.(\d+)\.blocks\.(\d+)\.norm\.", r"stages.\1.blocks.\2.norm1."),
    (r"^layers\.(\d+)\.blocks\.", r"stages.\1.blocks."),
    (r"\.op\.(x_proj_weight|dt_projs_weight|dt_projs_bias|A_logs|Ds)$", r".mixer.ssm.\1"),
    (r"\.op\.", ".mixer."),
    (r"(\.blocks\.\d+)\.se\.(norm|global_reduce|channel_select)\.", r"\1.attn.\2."),
    (r"^classifier\.norm\.", "norm."),
    (r"^classifier\.head\.", "head."),
    (r"^outnorm(\d+)\.", r"feature_norms.\1."),  # the dense backbone's per-level norms
]


def rename_official_key(key: str) -> str:
    """One official key in our layout, using ``OFFICIAL_KEY_RULES``."""
    return rename_key(key, OFFICIAL_KEY_RULES)


def checkpoint_filter_fn(state_dict: Dict, model: nn.Module) -> Dict[str, Tensor]:
    """Convert a released EfficientVMamba checkpoint to this module's keys (no shape changes needed).

    A state dict already in our layout passes through unchanged. The dense backbone's ``outnorm{i}`` become
    ``feature_norms.{i}``; a model with feature norms keeps its own where the file has none.
    """
    state_dict = unwrap_state_dict(state_dict, ("state_dict", "model", "state_dict_ema", "model_ema"))
    if not any(k.startswith("stem.") for k in state_dict):
        state_dict = {rename_official_key(k): v for k, v in state_dict.items()}
    return with_own_weights(state_dict, model, "feature_norms.")


# The options of the EVSS blocks' ES2D mixer (the rest configure the skeleton).
_ES2D_ARGS = ("d_state", "ssm_ratio", "dt_rank", "scan_backend")


def _create_efficientvmamba(variant: str, pretrained: bool = False, num_ssm_stages: int = 2,
                            ir_expand_ratio: float = 4.0, ir_se_ratio: float = 0.125, **kwargs) -> HierarchicalMamba:
    """The hierarchical skeleton with EVSS stages (channels-last) first and inverted-residual stages (NCHW)
    after them: ``num_ssm_stages`` EVSS stages, ES2D options in ``_ES2D_ARGS``, ``ir_*`` for the rest;
    ``features_only`` gets the dense backbone's per-level feature norms."""
    evss = partial(EVSSBlock, **{name: kwargs.pop(name) for name in _ES2D_ARGS if name in kwargs})
    inverted = partial(inverted_residual, expand_ratio=ir_expand_ratio, se_ratio=ir_se_ratio)
    num_ir_stages = len(kwargs["depths"]) - num_ssm_stages
    return build_backbone(HierarchicalMamba, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                          dense_feature_norms=True, block_layer=[evss] * num_ssm_stages + [inverted] * num_ir_stages,
                          stage_layer=[ChannelsLastStage] * num_ssm_stages + [Stage] * num_ir_stages, **kwargs)


def _cfg(**kwargs) -> dict:
    # README: "released under the Apache 2.0 license" (the repository has no LICENSE file).
    return imagenet_cfg(**{"first_conv": "stem.proj", "license": "apache-2.0", "paper_ids": "arXiv:2403.09977",
                           **kwargs})


_HF = "https://huggingface.co/TerryPei/EfficientVMamba-"
default_cfgs = generate_default_cfgs({
    # Released weights live in the Hugging Face repos below; their file names are not recorded, so no
    # download source is set: fetch the file by hand and convert it with ``checkpoint_filter_fn``.
    # The released models were trained with drop_path_rate 0.1 (v1.0.0 training logs); the repo yamls say 0.2.
    "efficientvmamba_tiny.in1k": _cfg(origin_url=_HF + "Tiny"),
    "efficientvmamba_small.in1k": _cfg(origin_url=_HF + "Small"),
    "efficientvmamba_base.in1k": _cfg(origin_url=_HF + "Base"),
    "test_efficientvmamba.untrained": _cfg(input_size=(3, 32, 32), pool_size=(1, 1)),
})


@register_model
def efficientvmamba_tiny(pretrained: bool = False, **kwargs) -> HierarchicalMamba:
    """EfficientVMamba-T: 6.494 M parameters (official training log), 76.5 % top-1."""
    args = dict(depths=(2, 2, 4, 2), dims=48, drop_path_rate=0.1)
    return _create_efficientvmamba("efficientvmamba_tiny", pretrained, **dict(args, **kwargs))


@register_model
def efficientvmamba_small(pretrained: bool = False, **kwargs) -> HierarchicalMamba:
    """EfficientVMamba-S: 11.274 M parameters (official training log), 78.7 % top-1.

    Matches the released model (dims 64, as printed in ``log_efficient_vmamba_small.txt``), not the
    repository's ``vssm_efficient_small.yaml``, which says EMBED_DIM 96 (a 24.76 M model).
    """
    args = dict(depths=(2, 2, 4, 2), dims=64, drop_path_rate=0.1)
    return _create_efficientvmamba("efficientvmamba_small", pretrained, **dict(args, **kwargs))


@register_model
def efficientvmamba_base(pretrained: bool = False, **kwargs) -> HierarchicalMamba:
    """EfficientVMamba-B: 33.717 M parameters (official training log), 81.8 % top-1."""
    args = dict(depths=(2, 2, 9, 2), dims=96, drop_path_rate=0.1)
    return _create_efficientvmamba("efficientvmamba_base", pretrained, **dict(args, **kwargs))


@register_model
def test_efficientvmamba(pretrained: bool = False, **kwargs) -> HierarchicalMamba:
    """Smallest EfficientVMamba for tests (timm's ``test_*`` convention)."""
    args = dict(depths=(1, 1, 1, 1), dims=8, d_state=2, drop_path_rate=0.0)
    return _create_efficientvmamba("test_efficientvmamba", pretrained, **dict(args, **kwargs))
