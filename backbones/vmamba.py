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

from typing import Callable, Dict, Optional, Sequence, Union

import torch
from timm.layers import DropPath, Mlp
from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn

from ._checkpoint import KeyRules, rename_key, unwrap_state_dict
from ._features import HierarchicalFeaturesMixin, create_hierarchical, imagenet_cfg
from .layers import LayerNorm2d, flagged_no_weight_decay, init_linear_trunc_normal
from .ss2d import SS2D

__all__ = ["VMamba", "VSSBlock"]


class PatchEmbed(nn.Module):
    """Non-overlapping patch stem of the vanilla model: conv k=s=patch_size, then LayerNorm."""

    def __init__(self, in_chans: int, dim: int, patch_size: int = 4) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.norm = LayerNorm2d(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x))


class OverlapStem(nn.Module):
    """Stem of the v2 models: two 3x3 stride-2 convs with LayerNorm, GELU between them."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1)
        self.norm1 = LayerNorm2d(dim // 2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1)
        self.norm2 = LayerNorm2d(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))


class PatchMerging(nn.Module):
    """Swin-style 2x2 merge (vanilla model): gather 4 neighbours, LayerNorm(4C), Linear 4C -> out."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.pad(x, (0, x.shape[3] % 2, 0, x.shape[2] % 2)).permute(0, 2, 3, 1)
        x = torch.cat((x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]), dim=-1)
        return self.reduction(self.norm(x)).permute(0, 3, 1, 2)


class ConvDownsample(nn.Module):
    """Downsampling of the v2 models: 3x3 stride-2 conv, then LayerNorm."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, 3, stride=2, padding=1)
        self.norm = LayerNorm2d(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


class VSSBlock(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)) (SS2D by default), then x + MLP(norm(x)) when mlp_ratio > 0.

    Args:
        dim: channels.
        drop_path: stochastic-depth rate of both residual branches.
        mlp_ratio: MLP hidden width as a multiple of dim; 0 removes the MLP (vanilla model).
        norm_layer: channels-last normalisation.
        mixer_layer: ``(dim, **ssm_kwargs) -> channels-last module``, the token mixer; ``SS2D`` by default
            (``backbones.mhs.MultiHeadScanMixer`` takes the same arguments).
        **ssm_kwargs: passed to the mixer.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, mlp_ratio: float = 4.0,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
                 mixer_layer: Callable[..., nn.Module] = SS2D, **ssm_kwargs) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.mixer = mixer_layer(dim, **ssm_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if mlp_ratio > 0:
            self.norm2 = norm_layer(dim)
            self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        else:
            self.norm2 = self.mlp = None

    def forward(self, x: Tensor) -> Tensor:
        """(batch, height, width, dim) -> same shape."""
        x = x + self.drop_path(self.mixer(self.norm1(x)))
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class Stage(nn.Module):
    """Optional downsample, then blocks on NCHW maps, with optional gradient checkpointing."""

    def __init__(self, downsample: nn.Module, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def run_blocks(self, x: Tensor) -> Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            from timm.models import checkpoint_seq
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.run_blocks(self.downsample(x))


class VSSStage(Stage):
    """A stage of VSS blocks: NCHW in and out, channels-last inside."""

    def forward(self, x: Tensor) -> Tensor:
        return self.run_blocks(self.downsample(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class VMamba(HierarchicalFeaturesMixin, nn.Module):
    """VMamba image classifier / backbone (timm model API).

    Args:
        in_chans: input image channels.
        num_classes: classifier outputs; 0 gives pooled features.
        depths: blocks per stage.
        dims: channels per stage, or the first stage's (doubled per stage).
        d_state: SSM state size.
        ssm_ratio: SS2D inner width as a multiple of the stage width.
        dt_rank: dt projection rank or "auto".
        d_conv: SS2D depthwise conv kernel.
        conv_bias: SS2D depthwise conv bias.
        gated: SS2D z gate (vanilla model) or not (v2 models).
        mlp_ratio: MLP width ratio, 0 for no MLP.
        stem_layer: ``(in_chans, dim) -> module`` for the stride-4 stem.
        downsample_layer: ``(dim, out_dim) -> module`` between stages.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, increasing linearly over all blocks.
        global_pool: "avg" or "" (no pooling).
        scan_backend: selective-scan backend for every SS2D.
        mixer_layer: the blocks' token mixer (see ``VSSBlock``); ``SS2D`` by default.
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, depths: Sequence[int] = (2, 2, 9, 2),
                 dims: Union[int, Sequence[int]] = 96, d_state: int = 16, ssm_ratio: float = 2.0,
                 dt_rank: Union[int, str] = "auto", d_conv: int = 3, conv_bias: bool = True,
                 gated: bool = True, mlp_ratio: float = 4.0,
                 stem_layer: Callable[[int, int], nn.Module] = PatchEmbed,
                 downsample_layer: Callable[[int, int], nn.Module] = PatchMerging, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, global_pool: str = "avg", scan_backend: str = "auto",
                 mixer_layer: Callable[..., nn.Module] = SS2D) -> None:
        super().__init__()
        if isinstance(dims, int):
            dims = [dims * 2 ** i for i in range(len(depths))]
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = dims[-1]
        self.drop_rate = drop_rate
        self.stem = stem_layer(in_chans, dims[0])
        rates = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]
        ssm_kwargs = dict(d_state=d_state, ssm_ratio=ssm_ratio, dt_rank=dt_rank, d_conv=d_conv,
                          conv_bias=conv_bias, gated=gated, scan_backend=scan_backend, mixer_layer=mixer_layer)
        stages, self.feature_info = [], []
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            downsample = downsample_layer(dims[i - 1], dim) if i else nn.Identity()
            blocks = [VSSBlock(dim, rates[sum(depths[:i]) + j], mlp_ratio, **ssm_kwargs) for j in range(depth)]
            stages.append(VSSStage(downsample, blocks))
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self._init_head(dims[-1], num_classes, drop_rate)

    def _init_head(self, num_features: int, num_classes: int, drop_rate: float) -> None:
        """Final norm, dropout and classifier, then the weight init of the whole model (call last)."""
        self.norm = LayerNorm2d(num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Truncated-normal linear layers as the official models; SSM parameters keep Mamba's init."""
        init_linear_trunc_normal(module)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Names of the SSM's A_logs and Ds, which the official recipe keeps out of weight decay."""
        return flagged_no_weight_decay(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# Official key -> ours, applied in order with ``re.sub`` (a replacement may be a function of the match).
# Official stage i ends with its downsample; ours starts stage i + 1 with it. MSVMamba extends these.
BODY_RULES: KeyRules = [
    (r"^layers\.(\d+)\.downsample\.(reduction|norm)\.", lambda m: f"stages.{int(m[1]) + 1}.downsample.{m[2]}."),
    (r"^layers\.(\d+)\.downsample\.1\.", lambda m: f"stages.{int(m[1]) + 1}.downsample.conv."),
    (r"^layers\.(\d+)\.downsample\.3\.", lambda m: f"stages.{int(m[1]) + 1}.downsample.norm."),
    (r"^layers\.(\d+)\.blocks\.(\d+)\.norm\.", r"stages.\1.blocks.\2.norm1."),
    (r"^layers\.(\d+)\.blocks\.", r"stages.\1.blocks."),
    (r"\.op\.(x_proj_weight|dt_projs_weight|dt_projs_bias|A_logs|Ds)$", r".mixer.ssm.\1"),
    (r"\.op\.", ".mixer."),
    (r"^classifier\.norm\.", "norm."),
    (r"^classifier\.head\.", "head."),
]
# The v0 release predates the official code's renaming (which its ``_load_from_state_dict`` still does).
_V0_NAMES: KeyRules = [
    (r"^patch_embed\.proj\.", "patch_embed.0."), (r"^patch_embed\.norm\.", "patch_embed.2."),
    (r"\.ln_1\.", ".norm."), (r"\.self_attention\.", ".op."),
    (r"^norm\.", "classifier.norm."), (r"^head\.", "classifier.head."),
]
OFFICIAL_KEY_RULES: Dict[str, KeyRules] = {
    # v0/v1 code: patch-4 stem (conv, permute, norm) and patch merging.
    "v1": [*_V0_NAMES, (r"^patch_embed\.0\.", "stem.proj."), (r"^patch_embed\.2\.", "stem.norm."), *BODY_RULES],
    # v2 releases: overlapping stem (conv, -, norm, -, GELU, conv, -, norm) and conv downsampling.
    "v2": [(r"^patch_embed\.0\.", "stem.conv1."), (r"^patch_embed\.2\.", "stem.norm1."),
           (r"^patch_embed\.5\.", "stem.conv2."), (r"^patch_embed\.7\.", "stem.norm2."), *BODY_RULES],
}


def official_generation(state_dict: Dict[str, Tensor]) -> str:
    """"v2" for checkpoints with the overlapping stem (``patch_embed.5``), else "v1"."""
    return "v2" if "patch_embed.5.weight" in state_dict else "v1"


def checkpoint_filter_fn(state_dict: Dict, model: nn.Module) -> Dict[str, Tensor]:
    """Convert an official VMamba checkpoint (the v0 release or the v2 releases) to this module's keys.

    No tensor changes shape. Of a checkpoint holding ``model`` and ``model_ema``, the ``model`` weights
    are used; pass ``checkpoint["model_ema"]`` for the EMA ones. A state dict in our layout passes through.
    """
    state_dict = unwrap_state_dict(state_dict)
    if any(k.startswith("stem.") for k in state_dict):
        return state_dict
    rules = OFFICIAL_KEY_RULES[official_generation(state_dict)]
    return {rename_key(k, rules): v for k, v in state_dict.items()}


def _create_vmamba(variant: str, pretrained: bool = False, **kwargs) -> VMamba:
    return create_hierarchical(VMamba, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


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


@register_model
def vanilla_vmamba_tiny(pretrained: bool = False, **kwargs) -> VMamba:
    """Vanilla VMamba-T (v0 release): 22.89 M parameters, 82.2 % ImageNet top-1."""
    args = dict(depths=(2, 2, 9, 2), dims=96, d_state=16, ssm_ratio=2.0, mlp_ratio=0.0, drop_path_rate=0.2)
    return _create_vmamba("vanilla_vmamba_tiny", pretrained, **dict(args, **kwargs))


@register_model
def vmamba_tiny_s2l5(pretrained: bool = False, **kwargs) -> VMamba:
    """VMamba-T[s2l5]: 30.71 M parameters, 82.5 % top-1."""
    args = dict(_V2, depths=(2, 2, 5, 2), dims=96, ssm_ratio=2.0, drop_path_rate=0.2)
    return _create_vmamba("vmamba_tiny_s2l5", pretrained, **dict(args, **kwargs))


@register_model
def vmamba_small_s2l15(pretrained: bool = False, **kwargs) -> VMamba:
    """VMamba-S[s2l15]: 50.15 M parameters, 83.6 % top-1."""
    args = dict(_V2, depths=(2, 2, 15, 2), dims=96, ssm_ratio=2.0, drop_path_rate=0.3)
    return _create_vmamba("vmamba_small_s2l15", pretrained, **dict(args, **kwargs))


@register_model
def vmamba_base_s2l15(pretrained: bool = False, **kwargs) -> VMamba:
    """VMamba-B[s2l15]: 88.56 M parameters, 83.9 % top-1."""
    args = dict(_V2, depths=(2, 2, 15, 2), dims=128, ssm_ratio=2.0, drop_path_rate=0.6)
    return _create_vmamba("vmamba_base_s2l15", pretrained, **dict(args, **kwargs))


@register_model
def vmamba_tiny_s1l8(pretrained: bool = False, **kwargs) -> VMamba:
    """VMamba-T[s1l8], the headline VMamba-T: 30.25 M parameters, 82.6 % top-1."""
    args = dict(_V2, depths=(2, 2, 8, 2), dims=96, ssm_ratio=1.0, drop_path_rate=0.2)
    return _create_vmamba("vmamba_tiny_s1l8", pretrained, **dict(args, **kwargs))


@register_model
def vmamba_femto(pretrained: bool = False, **kwargs) -> VMamba:
    """A small v2-style VMamba (not an official release) for CPU demos on small images."""
    args = dict(_V2, depths=(1, 1, 3, 1), dims=32, ssm_ratio=1.0, drop_path_rate=0.05)
    return _create_vmamba("vmamba_femto", pretrained, **dict(args, **kwargs))


@register_model
def test_vmamba(pretrained: bool = False, **kwargs) -> VMamba:
    """Smallest VMamba for tests (timm's ``test_*`` convention)."""
    args = dict(_V2, depths=(1, 1, 1, 1), dims=8, ssm_ratio=1.0, drop_path_rate=0.0)
    return _create_vmamba("test_vmamba", pretrained, **dict(args, **kwargs))
