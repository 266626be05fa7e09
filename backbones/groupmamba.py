"""GroupMamba: Modulated Group Mamba layers on a conv stem (Amshaker/GroupMamba, CVPR 2025).

The Modulated Group Mamba layer splits the channels into four groups and gives each group its own
one-route selective scan (VSSS): group 1 scans row-major, group 2 column-major, groups 3 and 4 the
reverses of those. Each group is an ordinary ``SS2D`` whose scan pattern is one route of VMamba's
cross scan (``RouteConcat(CrossScan(), (k,))``), so the four groups together see all four
directions at a quarter of the cost of a cross scan. The concatenated result is scaled by the
normalised input, modulated by a squeeze-excite style channel-affinity gate, normalised (by the same
LayerNorm as the input) and projected. Blocks pair the layer with a PVT-v2 FFN (depthwise conv between
the two linears). The classifier pools stage 4 into one class token, refines it with one more
layer + FFN (``ClassBlock``) and feeds two heads, the usual one and a DeiT-style distillation head.

Key layout: ``OFFICIAL_KEY_RULES`` and ``checkpoint_filter_fn`` turn the released checkpoints into this
module's names (see the rule list for the mapping; no shapes change).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Dict, Sequence, Tuple, Union

import torch
from timm.layers import DropPath, Mlp
from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn

from ._checkpoint import KeyRules, rename_key, unwrap_state_dict
from ._features import MambaBackbone, build_backbone, imagenet_cfg
from .layers import ChannelGate, ChannelsLastStage, ConvDownsample, LayerNorm2d, build_stages, init_linear_trunc_normal
from .scan_patterns import CrossScan, RouteConcat
from .ss2d import SS2D

__all__ = ["ClassBlock", "GroupMamba", "GroupMambaBlock", "ModulatedGroupMamba", "OFFICIAL_KEY_RULES",
           "checkpoint_filter_fn", "rename_official_key"]

# Route k of ``CrossScan`` that group k scans: row-major, column-major, and their reverses.
GROUP_ROUTES = (0, 1, 2, 3)


class ModulatedGroupMamba(nn.Module):
    """The Modulated Group Mamba layer on channels-last maps (its own pre-norm included).

    n = norm(x); y = concat_k SS2D_k(n_k) over the four channel groups n_k, each scanned along one
    direction; y = y * skip_scale * n * affinity(n); out = proj(norm(y)) with the SAME ``norm``.

    Args:
        dim: channels (divisible by 4).
        d_state: SSM state size of each group.
        ssm_ratio: inner width of each group's SS2D as a multiple of dim / 4.
        d_conv: depthwise conv kernel of each group's SS2D.
        reduction: channel reduction of the affinity gate.
        routes: which ``CrossScan`` route each group scans.
        scan_backend: selective-scan backend.
    """

    def __init__(self, dim: int, d_state: int = 1, ssm_ratio: float = 1.0, d_conv: int = 3, reduction: int = 16,
                 routes: Sequence[int] = GROUP_ROUTES, scan_backend: str = "auto") -> None:
        super().__init__()
        if dim % len(routes):
            raise ValueError(f"ModulatedGroupMamba: dim={dim} must be divisible by the {len(routes)} groups")
        self.norm = nn.LayerNorm(dim)
        self.affinity = ChannelGate(dim, reduction)
        self.groups = nn.ModuleList(
            SS2D(dim // len(routes), d_state=d_state, ssm_ratio=ssm_ratio, d_conv=d_conv, conv_bias=True,
                 gated=True, pattern=RouteConcat(CrossScan(), (route,)), scan_backend=scan_backend)
            for route in routes)
        self.skip_scale = nn.Parameter(torch.ones(1))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """(batch, height, width, dim) -> same shape."""
        x = self.norm(x)
        gate = self.affinity(x)
        chunks = x.chunk(len(self.groups), dim=-1)
        # Chunks by index, not zip: FX tracing cannot iterate the traced tuple.
        y = torch.cat([group(chunks[i]) for i, group in enumerate(self.groups)], dim=-1)
        y = y * self.skip_scale * x * gate
        return self.proj(self.norm(y))


class DepthwiseConvMlp(nn.Module):
    """PVT-v2 feed-forward on channels-last maps: fc1 -> 3x3 depthwise conv -> GELU -> fc2."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.dwconv(self.fc1(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.fc2(self.act(x))


class GroupMambaBlock(nn.Module):
    """x + DropPath(ModulatedGroupMamba(x)), then x + DropPath(DepthwiseConvMlp(norm2(x))); channels-last.

    The mixer normalises its own input, so there is no norm1.
    """

    def __init__(self, dim: int, mlp_ratio: float, drop_path: float = 0.0,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, **mixer_kwargs) -> None:
        super().__init__()
        self.mixer = ModulatedGroupMamba(dim, **mixer_kwargs)
        self.norm2 = norm_layer(dim)
        self.mlp = DepthwiseConvMlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.mixer(x))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ClassBlock(nn.Module):
    """Refines the class token (mean of the stage-4 tokens) with one group-Mamba layer and an MLP.

    The token is scanned as a 1x1 map; t = t + norm1(mixer(t)); t = t + mlp(norm2(t)).
    """

    def __init__(self, dim: int, mlp_ratio: float, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
                 **mixer_kwargs) -> None:
        super().__init__()
        self.mixer = ModulatedGroupMamba(dim, **mixer_kwargs)
        self.norm1 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.norm2 = norm_layer(dim)

    def forward(self, token: Tensor) -> Tensor:
        """(batch, dim) -> (batch, dim)."""
        token = token[:, None, None, :]
        token = token + self.norm1(self.mixer(token))
        token = token + self.mlp(self.norm2(token))
        return token.flatten(1)


class ConvStem(nn.Module):
    """Stride-4 stem: 7x7 s2 conv, two 3x3 convs (each with BatchNorm + ReLU), 3x3 s2 projection, LayerNorm."""

    def __init__(self, in_chans: int, hidden_dim: int, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, hidden_dim, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden_dim)
        self.conv2 = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden_dim)
        self.conv3 = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(hidden_dim)
        self.act = nn.ReLU(inplace=True)
        self.proj = nn.Conv2d(hidden_dim, dim, 3, stride=2, padding=1)
        self.norm = LayerNorm2d(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        x = self.act(self.bn2(self.conv2(x)))
        x = self.act(self.bn3(self.conv3(x)))
        return self.norm(self.proj(x))


class GroupMamba(MambaBackbone):
    """GroupMamba image classifier / backbone (timm model API).

    Distillation contract (``distilled=True``, as the released models): the model has two heads on the
    refined class token, ``head`` and ``head_dist``. In training mode ``forward`` returns the tuple
    ``(cls_logits, dist_logits)`` for a DeiT-style loss (``cls_logits`` against the labels,
    ``dist_logits`` against the teacher's hard predictions); in eval mode it returns their mean.
    ``set_distilled_training(False)`` makes training return the mean too. With ``num_classes=0`` or
    ``pre_logits=True`` the output is the (single) pooled feature vector.

    Args:
        in_chans: input image channels.
        num_classes: classifier outputs; 0 gives pooled features.
        depths: blocks per stage.
        embed_dims: channels per stage (each divisible by 4).
        mlp_ratios: FFN width ratio per stage (the last one also for the class block).
        stem_hidden_dim: width of the stem's convs.
        d_state: SSM state size.
        ssm_ratio: inner width of each group's SS2D.
        d_conv: depthwise conv kernel of each group's SS2D.
        reduction: channel-affinity reduction.
        distilled: add the distillation head.
        drop_rate: dropout before the heads.
        drop_path_rate: stochastic depth, increasing linearly over all blocks.
        global_pool: "avg" (class token = token mean, refined by the class block) or "" (no pooling).
        scan_backend: selective-scan backend.
    """

    has_stage_inputs = True

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, depths: Sequence[int] = (3, 4, 9, 3),
                 embed_dims: Sequence[int] = (64, 128, 348, 448), mlp_ratios: Sequence[float] = (8, 8, 4, 4),
                 stem_hidden_dim: int = 32, d_state: int = 1, ssm_ratio: float = 1.0, d_conv: int = 3,
                 reduction: int = 16, distilled: bool = True, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 global_pool: str = "avg", scan_backend: str = "auto") -> None:
        super().__init__()
        self.in_chans = in_chans
        self.distilled, self.distilled_training = distilled, True
        norm_layer = partial(nn.LayerNorm, eps=1e-6)  # the official stage, block and class-block norms
        mixer_kwargs = dict(d_state=d_state, ssm_ratio=ssm_ratio, d_conv=d_conv, reduction=reduction,
                            scan_backend=scan_backend)
        self.stem = ConvStem(in_chans, stem_hidden_dim, embed_dims[0])
        block_layers = [partial(GroupMambaBlock, mlp_ratio=ratio, norm_layer=norm_layer, **mixer_kwargs)
                        for ratio in mlp_ratios]
        # Stages 1-3 end with a norm; the last stage's is applied to the class token instead (``self.norm``).
        stage_layers = [partial(ChannelsLastStage, norm_layer=norm_layer)] * (len(depths) - 1) + [ChannelsLastStage]
        self.stages, self.feature_info = build_stages(depths, embed_dims, block_layers, stage_layers, ConvDownsample,
                                                      drop_path_rate)
        self.cls_block = ClassBlock(embed_dims[-1], mlp_ratios[-1], norm_layer, **mixer_kwargs)
        self.norm = norm_layer(embed_dims[-1])
        self._init_classifier(embed_dims[-1], num_classes, drop_rate, global_pool)
        self.apply(self._init_weights)

    def _reset_heads(self, num_classes: int) -> None:
        super()._reset_heads(num_classes)
        self.head_dist = self._linear_head(num_classes) if self.distilled else None

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """The official init: truncated-normal linears, fan-out normal convs; SSM parameters keep Mamba's."""
        init_linear_trunc_normal(module)
        if isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
            nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None),
            (r"^stages\.(\d+)\.norm", (99998,)), (r"^cls_block|^norm", (99999,))])

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        """Whether training-mode ``forward`` returns ``(cls_logits, dist_logits)`` (True) or their mean."""
        self.distilled_training = enable

    @torch.jit.ignore
    def get_classifier(self) -> Union[nn.Module, Tuple[nn.Module, nn.Module]]:
        return (self.head, self.head_dist) if self.distilled else self.head

    def _norm_level(self, feature: Tensor) -> Tensor:
        """The final norm (which the classifier applies to the class token), over the map's channels."""
        return self.norm(feature.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def _prune_head(self) -> None:
        self.cls_block = nn.Identity()
        super()._prune_head()

    def _pool(self, x: Tensor) -> Tensor:
        """The class token: the stage-4 mean refined by the class block, then the final norm."""
        return self.norm(self.cls_block(x.mean(dim=(2, 3))))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        if not self.global_pool:
            return x
        token = super().forward_head(x, pre_logits=True)
        if pre_logits or self.num_classes == 0:
            return token
        logits = self.head(token)
        if self.head_dist is None:
            return logits
        dist_logits = self.head_dist(token)
        if self.training and self.distilled_training and not torch.jit.is_scripting():
            return logits, dist_logits
        return (logits + dist_logits) / 2


# Official key -> ours, applied in order with ``re.sub``. Official: ``patch_embed1`` (stem: conv.{0,3,6}
# convs, conv.{1,4,7} BatchNorms, proj, norm), ``patch_embed{2..4}.{proj,norm}``, ``block{s}.{j}``,
# ``norm{1..3}`` after stages 1-3, ``norm4`` on the class token, ``post_network.0`` (class block),
# ``head``, ``dist_head``; inside a layer ``attn.{norm, fc1, fc2, skip_scale, proj, mamba_g{1..4}}``.
OFFICIAL_KEY_RULES: KeyRules = [
    (r"^patch_embed1\.conv\.([036])\.", lambda m: f"stem.conv{int(m[1]) // 3 + 1}."),
    (r"^patch_embed1\.conv\.([147])\.", lambda m: f"stem.bn{int(m[1]) // 3 + 1}."),
    (r"^patch_embed1\.(proj|norm)\.", r"stem.\1."),
    (r"^patch_embed([234])\.proj\.", lambda m: f"stages.{int(m[1]) - 1}.downsample.conv."),
    (r"^patch_embed([234])\.norm\.", lambda m: f"stages.{int(m[1]) - 1}.downsample.norm."),
    (r"^block([1234])\.", lambda m: f"stages.{int(m[1]) - 1}.blocks."),
    (r"^norm([123])\.", lambda m: f"stages.{int(m[1]) - 1}.norm."),
    (r"^norm4\.", "norm."),
    (r"^post_network\.0\.", "cls_block."),
    (r"^dist_head\.", "head_dist."),
    (r"\.attn\.mamba_g([1234])\.(x_proj_weight|dt_projs_weight|dt_projs_bias|A_logs|Ds)$",
     lambda m: f".mixer.groups.{int(m[1]) - 1}.ssm.{m[2]}"),
    (r"\.attn\.mamba_g([1234])\.", lambda m: f".mixer.groups.{int(m[1]) - 1}."),
    (r"\.attn\.fc([12])\.", r".mixer.affinity.fc\1."),
    (r"\.attn\.", ".mixer."),
    (r"\.mlp\.dwconv\.dwconv\.", ".mlp.dwconv."),
]


def rename_official_key(key: str) -> str:
    """One official key in our layout, using ``OFFICIAL_KEY_RULES``."""
    return rename_key(key, OFFICIAL_KEY_RULES)


def checkpoint_filter_fn(state_dict: Dict, model: nn.Module) -> Dict[str, Tensor]:
    """Convert a released GroupMamba checkpoint to this module's keys (no shape changes needed).

    A state dict already in our layout passes through unchanged; with a model built without the
    distillation head, the official ``dist_head`` weights are dropped.
    """
    state_dict = unwrap_state_dict(state_dict)
    if not any(k.startswith("stem.") for k in state_dict):
        state_dict = {rename_official_key(k): v for k, v in state_dict.items()}
    if getattr(model, "head_dist", None) is None:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head_dist.")}
    return state_dict


def _create_groupmamba(variant: str, pretrained: bool = False, **kwargs) -> GroupMamba:
    return build_backbone(GroupMamba, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def _cfg(**kwargs) -> dict:
    return imagenet_cfg(**{"first_conv": "stem.conv1", "classifier": ("head", "head_dist"), "license": "mit",
                           "paper_ids": "arXiv:2407.13772", **kwargs})


_HF = "https://huggingface.co/Abdelrahman-shaker/GroupMamba-"
default_cfgs = generate_default_cfgs({
    # The weights are published on the Hugging Face pages below and on Google Drive (README); their
    # file names are not recorded in the repository, so no download source is set: fetch the file by
    # hand and convert it with ``checkpoint_filter_fn``.
    "groupmamba_tiny.in1k": _cfg(origin_url=_HF + "Tiny"),
    "groupmamba_small.in1k": _cfg(origin_url=_HF + "Small"),
    "groupmamba_base.in1k": _cfg(origin_url=_HF + "Base"),
    "test_groupmamba.untrained": _cfg(input_size=(3, 32, 32), pool_size=(1, 1), license="apache-2.0"),
})


@register_model
def groupmamba_tiny(pretrained: bool = False, **kwargs) -> GroupMamba:
    """GroupMamba-T: 23.36 M parameters with the distillation head (22.91 M without), 83.3 % top-1.

    Count measured by building the official ``groupmamba_tiny`` (Amshaker/GroupMamba,
    classification/models/groupmamba.py); the README rounds it to 23 M.
    """
    args = dict(depths=(3, 4, 9, 3), embed_dims=(64, 128, 348, 448), mlp_ratios=(8, 8, 4, 4), stem_hidden_dim=32,
                drop_path_rate=0.05)
    return _create_groupmamba("groupmamba_tiny", pretrained, **dict(args, **kwargs))


@register_model
def groupmamba_small(pretrained: bool = False, **kwargs) -> GroupMamba:
    """GroupMamba-S: 34.78 M parameters with the distillation head, 83.9 % top-1.

    Count measured by building the official ``groupmamba_small``; the README rounds it to 34 M.
    """
    args = dict(depths=(3, 4, 16, 3), embed_dims=(64, 128, 348, 512), mlp_ratios=(8, 8, 4, 4), stem_hidden_dim=64,
                drop_path_rate=0.05)
    return _create_groupmamba("groupmamba_small", pretrained, **dict(args, **kwargs))


@register_model
def groupmamba_base(pretrained: bool = False, **kwargs) -> GroupMamba:
    """GroupMamba-B: 57.15 M parameters with the distillation head, 84.5 % top-1.

    Count measured by building the official ``groupmamba_base``; the README rounds it to 57 M.
    """
    args = dict(depths=(3, 6, 21, 3), embed_dims=(96, 192, 424, 512), mlp_ratios=(8, 8, 4, 4), stem_hidden_dim=64,
                drop_path_rate=0.05)
    return _create_groupmamba("groupmamba_base", pretrained, **dict(args, **kwargs))


@register_model
def test_groupmamba(pretrained: bool = False, **kwargs) -> GroupMamba:
    """Smallest GroupMamba for tests (timm's ``test_*`` convention)."""
    args = dict(depths=(1, 1, 1, 1), embed_dims=(16, 16, 32, 32), mlp_ratios=(2, 2, 2, 2), stem_hidden_dim=8,
                reduction=4, drop_path_rate=0.0)
    return _create_groupmamba("test_groupmamba", pretrained, **dict(args, **kwargs))
