"""MSVMamba: multi-scale 2-D selective scan (MS2D), squeeze-excite and ConvFFN (YuHengsss/MSVMamba).

MS2D scans each map at two scales: ONE route at full resolution (after the usual 3x3 depthwise conv)
and the remaining three directions on a half-resolution copy (a 7x7 stride-2 depthwise conv of the
pre-conv map), where the three directions are joined into one sequence with one parameter set. The
half-resolution result is upsampled and added, so the model pays for one long scan instead of four.

Two generations are registered, both built from the same parts:

- v1 (``master`` branch, Nano/Micro/Tiny): z gate, LayerNorm on each scale's scan output before
  fusion, bilinear upsampling, patch-4 stem, patch merging, pre-norm ConvFFN x2.
- v3 (``v2`` branch, "MSVMambav3" Tiny/Small/Base): no z gate (except Base), one LayerNorm after
  fusion, nearest upsampling, overlapping conv stem, conv downsampling, post-norm ConvFFN x4.

Key layout: ``OFFICIAL_KEY_RULES`` and ``checkpoint_filter_fn`` turn either official checkpoint into
this module's names. The per-scale parameter sets sit in one ``RouteSSM`` with set 0 = full
resolution, set 1 = half resolution (the v3 order; v1 checkpoints store them the other way round and
are swapped on conversion).
"""

from __future__ import annotations

import re
from typing import Callable, Dict, Optional, Union

import torch.nn.functional as F
from timm.layers import DropPath
from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn

from ._checkpoint import VMAMBA_KEY_RULES, KeyRules, rename_key, unwrap_state_dict, with_own_weights
from ._features import build_backbone, imagenet_cfg
from .hierarchical import HierarchicalMamba
from .layers import ChannelGate, ConvDownsample, OverlapStem, PatchMerging, PatchStem
from .scan_patterns import CrossScan, RouteConcat, ScanPattern
from .ss2d import RouteSSM, resolve_dt_rank

__all__ = ["ConvFFN", "MSVMambaBlock", "MultiScaleSS2D", "OFFICIAL_KEY_RULES", "checkpoint_filter_fn",
           "rename_official_key"]


class ConvFFN(nn.Module):
    """MSVMamba's feed-forward on NCHW maps: 1x1 conv up, + residual 3x3 depthwise conv, GELU, 1x1 down.

    The depthwise conv gives the FFN the local mixing that the sparse multi-scale scan gives up.
    """

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(self.fc1(x))
        return self.drop(self.fc2(self.act(x + self.dwconv(x))))


class MultiScaleSS2D(nn.Module):
    """MS2D mixer on channels-last maps.

    in_proj -> (z split) -> [full: dwconv k3 -> act -> ``full_pattern``] and
    [low: dwconv k7 stride 2 -> act -> ``low_pattern``] -> one ``RouteSSM`` whose first parameter
    sets serve the full-resolution routes and the rest the low-resolution ones -> merge each scale,
    upsample the low one, add -> out_norm -> squeeze-excite -> (times silu(z)) -> out_proj.

    Args:
        d_model: input/output channels.
        d_state: SSM state size N.
        ssm_ratio: inner width as a multiple of d_model.
        dt_rank: dt projection rank, or "auto" for ceil(d_model / 16).
        d_conv: kernel of the full-resolution depthwise conv.
        low_conv: kernel of the stride-2 depthwise conv that makes the half-resolution map.
        conv_bias: whether both depthwise convs have a bias.
        gated: keep Mamba's multiplicative z branch.
        norm_each_scale: normalise each scale's scan output before fusing (v1) instead of the sum (v3).
        upsample_mode: ``F.interpolate`` mode for the half-resolution result ("bilinear" in v1,
            "nearest" in v3).
        se_reduction: channel reduction of the squeeze-excite gate.
        act_layer: activation after both depthwise convs.
        norm_layer: normalisation of the scan output.
        full_pattern: routes of the full-resolution map (default: one row-major route).
        low_pattern: routes of the half-resolution map (default: reversed row-major, column-major and
            reversed column-major joined into one sequence).
        dropout: dropout after out_proj.
        scan_backend: selective-scan backend.
    """

    def __init__(self, d_model: int, d_state: int = 1, ssm_ratio: float = 2.0, dt_rank: Union[int, str] = "auto",
                 d_conv: int = 3, low_conv: int = 7, conv_bias: bool = True, gated: bool = True,
                 norm_each_scale: bool = True, upsample_mode: str = "bilinear", se_reduction: int = 8,
                 act_layer: Callable[[], nn.Module] = nn.SiLU,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, full_pattern: Optional[ScanPattern] = None,
                 low_pattern: Optional[ScanPattern] = None, dropout: float = 0.0,
                 scan_backend: str = "auto") -> None:
        super().__init__()
        d_inner = int(ssm_ratio * d_model)
        self.gated, self.norm_each_scale, self.upsample_mode = gated, norm_each_scale, upsample_mode
        self.in_proj = nn.Linear(d_model, 2 * d_inner if gated else d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=conv_bias)
        self.conv2d_low = nn.Conv2d(d_inner, d_inner, low_conv, stride=2, padding=(low_conv - 1) // 2,
                                    groups=d_inner, bias=conv_bias)
        self.act = act_layer()
        self.full_pattern = full_pattern if full_pattern is not None else RouteConcat(CrossScan(), (0,))
        self.low_pattern = low_pattern if low_pattern is not None else RouteConcat(CrossScan(), (2, 1, 3))
        self.full_routes = slice(0, self.full_pattern.num_routes)
        self.low_routes = slice(self.full_pattern.num_routes, None)
        self.ssm = RouteSSM(d_inner, self.full_pattern.num_routes + self.low_pattern.num_routes, d_state,
                            resolve_dt_rank(dt_rank, d_model), scan_backend=scan_backend)
        self.out_norm = norm_layer(d_inner)
        self.se = ChannelGate(d_inner, se_reduction, bias=False)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _norm_routes(self, ys: Tensor) -> Tensor:
        """out_norm over the channels of route sequences (batch, K, C, L)."""
        return self.out_norm(ys.transpose(2, 3)).transpose(2, 3)

    def forward(self, x: Tensor) -> Tensor:
        """(batch, height, width, d_model) -> same shape."""
        size = x.shape[1:3]
        x = self.in_proj(x)
        if self.gated:
            x, z = x.chunk(2, dim=-1)
        x = x.permute(0, 3, 1, 2)
        full, low = self.act(self.conv2d(x)), self.act(self.conv2d_low(x))
        merge = not self.norm_each_scale  # v1 normalises the route outputs before merging them
        y_full = self.ssm.scan_map(full, self.full_pattern, self.full_routes, merge)
        y_low = self.ssm.scan_map(low, self.low_pattern, self.low_routes, merge)
        if self.norm_each_scale:
            y_full = self.full_pattern.merge(self._norm_routes(y_full), size)
            y_low = self.low_pattern.merge(self._norm_routes(y_low), low.shape[2:])
        align = False if self.upsample_mode in ("bilinear", "bicubic") else None
        y = y_full + F.interpolate(y_low, size=size, mode=self.upsample_mode, align_corners=align)
        y = y.permute(0, 2, 3, 1)
        if not self.norm_each_scale:
            y = self.out_norm(y)
        y = y * self.se(y)
        if self.gated:
            y = y * F.silu(z)
        return self.dropout(self.out_proj(y))


class MSVMambaBlock(nn.Module):
    """x + MS2D(norm1(x)), then the ConvFFN residual.

    v1 normalises before the FFN (x + FFN(norm2(x))); v3 normalises the FFN output inside the
    residual (x + norm2(FFN(x))), the post-norm layout of its channel-first code.

    Args:
        dim: channels.
        drop_path: stochastic-depth rate of both residual branches.
        ffn_ratio: ConvFFN hidden width as a multiple of dim.
        ffn_post_norm: v3's post-norm FFN residual.
        norm_layer: channels-last normalisation.
        **mixer_kwargs: passed to ``MultiScaleSS2D``.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, ffn_ratio: float = 2.0, ffn_post_norm: bool = False,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, **mixer_kwargs) -> None:
        super().__init__()
        self.ffn_post_norm = ffn_post_norm
        self.norm1 = norm_layer(dim)
        self.mixer = MultiScaleSS2D(dim, **mixer_kwargs)
        self.norm2 = norm_layer(dim)
        self.ffn = ConvFFN(dim, int(dim * ffn_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _ffn(self, x: Tensor) -> Tensor:
        return self.ffn(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(batch, height, width, dim) -> same shape."""
        x = x + self.drop_path(self.mixer(self.norm1(x)))
        if self.ffn_post_norm:
            return x + self.drop_path(self.norm2(self._ffn(x)))
        return x + self.drop_path(self._ffn(self.norm2(x)))


# Official key -> ours: VMamba's layout rules, then MSVMamba's own modules (the half-resolution conv, SE, ConvFFN).
_MSV_RULES: KeyRules = [
    (r"\.mixer\.conv2d_b1\.", ".mixer.conv2d_low."),
    (r"\.mixer\.se\.fc\.0\.", ".mixer.se.fc1."),
    (r"\.mixer\.se\.fc\.2\.", ".mixer.se.fc2."),
    (r"\.convFFN\.linear1\.", ".ffn.fc1."),
    (r"\.convFFN\.dwc\.", ".ffn.dwconv."),
    (r"\.convFFN\.linear2\.", ".ffn.fc2."),
]
OFFICIAL_KEY_RULES: Dict[str, KeyRules] = {
    # master branch: VMamba v1's patch-4 stem and patch merging.
    "v1": [*VMAMBA_KEY_RULES["v1"], *_MSV_RULES],
    # v2 branch: VMamba v2's overlapping stem and conv downsampling.
    "v3": [*VMAMBA_KEY_RULES["v2"], *_MSV_RULES],
}

_SSM_KEY = re.compile(r"\.mixer\.ssm\.(x_proj_weight|dt_projs_weight|dt_projs_bias|A_logs|Ds)$")


def _swap_scale_groups(value: Tensor) -> Tensor:
    """Exchange the two stacked SSM parameter sets (leading axis 2 or 2 * d_inner)."""
    return value.reshape(2, -1, *value.shape[1:]).flip(0).reshape(value.shape)


def rename_official_key(key: str, generation: str) -> str:
    """One official key in our layout, using the ``OFFICIAL_KEY_RULES`` of "v1" or "v3"."""
    return rename_key(key, OFFICIAL_KEY_RULES[generation])


def checkpoint_filter_fn(state_dict: Dict, model: nn.Module) -> Dict[str, Tensor]:
    """Convert an official MSVMamba checkpoint (v1 ``master`` or v3 ``v2`` branch) to this module's keys.

    The generation is read from the checkpoint: only v3's overlapping stem has ``patch_embed.5``. v1
    stores the half-resolution SSM parameter set first and ours second, so v1 sets are swapped. Of a
    checkpoint holding both, the ``model`` weights are used; pass ``checkpoint["model_ema"]`` for the
    EMA ones. A state dict already in our layout passes through unchanged. The dense backbone's ``outnorm{i}``
    become ``feature_norms.{i}``; a model with feature norms keeps its own where the file has none.
    """
    state_dict = unwrap_state_dict(state_dict)
    if not any(k.startswith("stem.") for k in state_dict):
        generation = "v3" if "patch_embed.5.weight" in state_dict else "v1"
        renamed = {}
        for key, value in state_dict.items():
            key = rename_official_key(key, generation)
            renamed[key] = _swap_scale_groups(value) if generation == "v1" and _SSM_KEY.search(key) else value
        state_dict = renamed
    return with_own_weights(state_dict, model, "feature_norms.")


def _create_msvmamba(variant: str, pretrained: bool = False, **kwargs) -> HierarchicalMamba:
    """The hierarchical skeleton with MSVMamba blocks; options other than the skeleton's go to
    ``MSVMambaBlock`` and its ``MultiScaleSS2D`` (``ffn_ratio``, ``ffn_post_norm``, ``d_state``, ``ssm_ratio``,
    ``gated``, ``norm_each_scale``, ``upsample_mode``, ``scan_backend``, ...); ``features_only`` gets the dense
    backbone's per-level feature norms."""
    return build_backbone(HierarchicalMamba, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                          dense_feature_norms=True, block_layer=MSVMambaBlock, **kwargs)


def _cfg(url: str = "", **kwargs) -> dict:
    # The repository ships no LICENSE file.
    return imagenet_cfg(url, **{"license": "unknown", "paper_ids": "arXiv:2405.14174", **kwargs})


_HF = "YuhengSSS/MSVMamba"
default_cfgs = generate_default_cfgs({
    # v1 weights are in Google Drive folders linked from the master README (no direct file URL).
    "msvmamba_nano.in1k": _cfg(first_conv="stem.proj", origin_url="https://github.com/YuHengsss/MSVMamba"),
    "msvmamba_micro.in1k": _cfg(first_conv="stem.proj", origin_url="https://github.com/YuHengsss/MSVMamba"),
    "msvmamba_tiny.in1k": _cfg(first_conv="stem.proj", origin_url="https://github.com/YuHengsss/MSVMamba"),
    "msvmamba_v3_tiny.in1k": _cfg(hf_hub_id=_HF, hf_hub_filename="msvmambav3_tiny_224.pth"),
    "msvmamba_v3_small.in1k": _cfg(hf_hub_id=_HF, hf_hub_filename="msvmambav3_small_224.pth"),
    "msvmamba_v3_base.in1k": _cfg(hf_hub_id=_HF, hf_hub_filename="msvmambav3_base_224.pth"),
    "test_msvmamba.untrained": _cfg(input_size=(3, 32, 32), pool_size=(1, 1), license="apache-2.0"),
})

# master branch, classification/configs/ms_vssm/vssm_{nano,micro,tiny}_224_ms.yaml.
_V1 = dict(d_state=1, ssm_ratio=2.0, gated=True, norm_each_scale=True, upsample_mode="bilinear", ffn_ratio=2.0,
           ffn_post_norm=False, stem_layer=PatchStem, downsample_layer=PatchMerging, drop_path_rate=0.2)
# v2 branch, classification/configs/msv2/msvmambav3_{tiny,small,base}_224.yaml ("vms_noz"/"vms").
_V3 = dict(d_state=1, ssm_ratio=1.0, gated=False, norm_each_scale=False, upsample_mode="nearest", ffn_ratio=4.0,
           ffn_post_norm=True, stem_layer=OverlapStem, downsample_layer=ConvDownsample)


@register_model
def msvmamba_nano(pretrained: bool = False, **kwargs) -> HierarchicalMamba:
    """MSVMamba-N: 6.86 M parameters (official yaml comment and measured build), 77.3 % top-1."""
    args = dict(_V1, depths=(1, 2, 5, 2), dims=48)
    return _create_msvmamba("msvmamba_nano", pretrained, **dict(args, **kwargs))


@register_model
def msvmamba_micro(pretrained: bool = False, **kwargs) -> HierarchicalMamba:
    """MSVMamba-M: 11.88 M parameters (official yaml comment and measured build), 79.8 % top-1."""
    args = dict(_V1, depths=(1, 2, 5, 2), dims=64)
    return _create_msvmamba("msvmamba_micro", pretrained, **dict(args, **kwargs))


@register_model
def msvmamba_tiny(pretrained: bool = False, **kwargs) -> HierarchicalMamba:
    """MSVMamba-T: 33.05 M parameters (measured official build; yaml comment 33.08 M), 82.8 % top-1."""
    args = dict(_V1, depths=(1, 2, 9, 2), dims=96)
    return _create_msvmamba("msvmamba_tiny", pretrained, **dict(args, **kwargs))


@register_model
def msvmamba_v3_tiny(pretrained: bool = False, **kwargs) -> HierarchicalMamba:
    """MSVMambav3-T: 32.26 M parameters (measured official build; README 32 M), 83.0 % top-1."""
    args = dict(_V3, depths=(2, 2, 9, 2), dims=96, drop_path_rate=0.2)
    return _create_msvmamba("msvmamba_v3_tiny", pretrained, **dict(args, **kwargs))


@register_model
def msvmamba_v3_small(pretrained: bool = False, **kwargs) -> HierarchicalMamba:
    """MSVMambav3-S: 50.22 M parameters (measured official build; README 50 M), 84.1 % top-1."""
    args = dict(_V3, depths=(2, 3, 20, 2), dims=96, drop_path_rate=0.4)
    return _create_msvmamba("msvmamba_v3_small", pretrained, **dict(args, **kwargs))


@register_model
def msvmamba_v3_base(pretrained: bool = False, **kwargs) -> HierarchicalMamba:
    """MSVMambav3-B: 90.59 M parameters (measured official build; README 91 M), 84.4 % top-1. Keeps the z gate."""
    args = dict(_V3, depths=(2, 4, 18, 2), dims=128, gated=True, drop_path_rate=0.5)
    return _create_msvmamba("msvmamba_v3_base", pretrained, **dict(args, **kwargs))


@register_model
def test_msvmamba(pretrained: bool = False, **kwargs) -> HierarchicalMamba:
    """Smallest (v3-style) MSVMamba for tests (timm's ``test_*`` convention)."""
    args = dict(_V3, depths=(1, 1, 1, 1), dims=8, drop_path_rate=0.0)
    return _create_msvmamba("test_msvmamba", pretrained, **dict(args, **kwargs))
