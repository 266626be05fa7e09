"""HRVMamba: an HRNet of dynamic visual state-space blocks (zhanghao5201/HRVMamba, arXiv 2410.03174).

HRNet layout: a stride-4 conv stem and two bottlenecks (stage 1), then stages 2-4 that keep 2, 3 and 4
parallel branches at strides 4, 8, 16 and 32 (a new, coarser branch is added by a strided conv before
each stage). Every branch runs DVSS blocks, and at the end of every module all branches exchange
information: coarser maps are projected (1x1 conv + BN) and upsampled, finer ones strided down
(depthwise 3x3 s2 + BN + 1x1 + BN per halving), summed and passed through ReLU. The model keeps its
stride-4 map throughout, which is what dense heads (pose heatmaps, segmentation) want.

DVSS block (NCHW): ESInB (LayerNorm -> depthwise convs with kernels 3/5/7/9 on four channel groups ->
channel shuffle -> GELU, plus the input), then x + DSS2D(LN(x)) and x + MLP(LN(x)). DSS2D is the
shared ``SS2D`` (4-route cross scan, no z gate, d_state 1) with its depthwise conv replaced by a
deformable ``DCNv4`` aggregation (``backbones.dcnv4``: pure PyTorch, or the fused CPU kernel when built).

Outputs: ``features_only=True`` gives the four branches (strides 4/8/16/32). The classifier fuses them
with HRNet's classification neck (bottleneck per branch to 128/256/512/1024 channels, strided convs
summing downwards, 1x1 conv to 2048) and pools. ``multiscale_output=False`` builds the pose-estimation
backbone exactly (the last module fuses into the stride-4 branch only, no neck), whose only output is
the stride-4 map.

Key layout: the official names are kept except inside the DVSS blocks; ``OFFICIAL_KEY_RULES`` and
``checkpoint_filter_fn`` convert classification (``model``) and mmpose/mmseg (``state_dict`` with a
``backbone.`` prefix) checkpoints.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct, DropPath, Mlp
from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import Bottleneck
from torch import Tensor, nn

from ._checkpoint import KeyRules, rename_key, unwrap_state_dict, with_own_weights
from ._features import MambaBackbone, build_backbone, imagenet_cfg
from .dcnv4 import DCNv4
from .layers import LayerNorm2d, init_linear_trunc_normal
from .ss2d import SS2D, resolve_dt_rank

__all__ = ["DVSSBlock", "HRVMamba", "HRVMambaModule", "MultiScaleDWConv", "OFFICIAL_KEY_RULES",
           "checkpoint_filter_fn", "rename_official_key"]


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """(b, groups * c, h, w) -> channel k * groups + g holds input channel g * c + k."""
    batch, channels, height, width = x.shape
    return x.view(batch, groups, channels // groups, height, width).transpose(1, 2).reshape(x.shape)


class MultiScaleDWConv(nn.Module):
    """ESInB: x + GELU(shuffle(concat_g dwconv_g(norm(x)_g))) with one kernel size per channel group.

    Args:
        dim: channels (divisible by the number of kernel sizes).
        kernel_sizes: depthwise kernel of each channel group.
    """

    def __init__(self, dim: int, kernel_sizes: Sequence[int] = (3, 5, 7, 9)) -> None:
        super().__init__()
        if dim % len(kernel_sizes):
            raise ValueError(f"MultiScaleDWConv: dim={dim} must be divisible by {len(kernel_sizes)} groups")
        width = dim // len(kernel_sizes)
        self.norm = LayerNorm2d(dim)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, k, padding=k // 2, groups=width) for k in kernel_sizes)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        chunks = self.norm(x).chunk(len(self.convs), dim=1)
        # Chunks by index, not zip: FX tracing cannot iterate the traced tuple.
        y = torch.cat([conv(chunks[i]) for i, conv in enumerate(self.convs)], dim=1)
        return x + self.act(channel_shuffle(y, len(self.convs)))


def deformable_conv_layer(d_model: int) -> Callable[[int], nn.Module]:
    """DSS2D's spatial mixer for a block of width ``d_model``: DCNv4 with one group per dt rank.

    The official models give the offset/mask projection a 3x3 depthwise conv exactly when d_model is
    a multiple of 80 (the Base widths), and use the DCNv4 build without value/output projections.
    """
    return partial(DCNv4, group=resolve_dt_rank("auto", d_model), dw_kernel_size=3 if d_model % 80 == 0 else None,
                   output_bias=False, without_pointwise=True)


class DVSSBlock(nn.Module):
    """Dynamic visual state-space block on NCHW maps: ESInB, then DSS2D and MLP residual branches.

    Args:
        dim: channels.
        drop_path: stochastic-depth rate of the DSS2D and MLP branches.
        d_state: SSM state size.
        ssm_ratio: DSS2D inner width as a multiple of dim.
        mlp_ratio: MLP hidden width as a multiple of dim.
        ssm_drop_rate: dropout after the DSS2D output projection.
        mlp_drop_rate: dropout after the MLP's activation and output (the pose recipes' ``mlp_drop_rate``).
        scan_backend: selective-scan backend.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, d_state: int = 1, ssm_ratio: float = 2.0,
                 mlp_ratio: float = 2.0, ssm_drop_rate: float = 0.0, mlp_drop_rate: float = 0.0,
                 scan_backend: str = "auto") -> None:
        super().__init__()
        self.local = MultiScaleDWConv(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = SS2D(dim, d_state=d_state, ssm_ratio=ssm_ratio, gated=False, dropout=ssm_drop_rate,
                          conv_layer=deformable_conv_layer(dim), scan_backend=scan_backend)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=mlp_drop_rate)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.local(x).permute(0, 2, 3, 1)
        x = x + self.drop_path(self.mixer(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.permute(0, 3, 1, 2)


def _fuse_layer(widths: Sequence[int], i: int, j: int) -> nn.Module:
    """How branch j reaches branch i's resolution and width."""
    if j == i:
        return nn.Identity()
    if j > i:  # coarser: 1x1 conv + BN here, bilinear upsampling in the forward
        return nn.Sequential(nn.Conv2d(widths[j], widths[i], 1, bias=False), nn.BatchNorm2d(widths[i]))
    steps = []
    for k in range(i - j):  # finer: one (dw 3x3 s2, BN, 1x1, BN) per halving, ReLU between halvings
        out = widths[i] if k == i - j - 1 else widths[j]
        layers = [nn.Conv2d(widths[j], widths[j], 3, stride=2, padding=1, groups=widths[j], bias=False),
                  nn.BatchNorm2d(widths[j]), nn.Conv2d(widths[j], out, 1, bias=False), nn.BatchNorm2d(out)]
        if k < i - j - 1:
            layers.append(nn.ReLU())
        steps.append(nn.Sequential(*layers))
    return nn.Sequential(*steps)


class HRVMambaModule(nn.Module):
    """Parallel branches of DVSS blocks, then the exchange unit (all branches, or only the finest).

    Args:
        widths: channels of each branch, finest first.
        depth: DVSS blocks per branch.
        drop_paths: stochastic-depth rate of block k (shared by all branches).
        multiscale_output: return every branch (True) or only the fused finest one.
        **block_kwargs: passed to ``DVSSBlock``.
    """

    def __init__(self, widths: Sequence[int], depth: int, drop_paths: Sequence[float], multiscale_output: bool = True,
                 **block_kwargs) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(*[DVSSBlock(width, drop_paths[k], **block_kwargs) for k in range(depth)]) for width in widths)
        num_out = len(widths) if multiscale_output else 1
        self.fuse_layers = nn.ModuleList(
            nn.ModuleList(_fuse_layer(widths, i, j) for j in range(len(widths))) for i in range(num_out))
        # One activation per output branch: each output map is a module's output, which timm's hook and
        # FX feature extractors (``feature_info`` module names) read.
        self.fuse_acts = nn.ModuleList(nn.ReLU() for _ in range(num_out))
        self.grad_checkpointing = False

    def drop_outputs(self, keep: Sequence[int]) -> None:
        """Stop fusing into the output branches not in ``keep`` (pruning): their exchange layers go."""
        for i in range(len(self.fuse_layers)):
            if i not in keep:
                self.fuse_layers[i] = nn.ModuleList()

    def forward(self, xs: List[Tensor], outputs: Optional[List[int]] = None) -> List[Tensor]:
        """The fused maps of the output branches ``outputs`` (all by default), in that order."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            from timm.models import checkpoint_seq
            xs = [checkpoint_seq(branch, x) for branch, x in zip(self.branches, xs)]
        else:
            xs = [branch(x) for branch, x in zip(self.branches, xs)]
        fused = []
        for i in range(len(self.fuse_layers)) if outputs is None else outputs:
            layers = self.fuse_layers[i]
            if len(layers) == 0:
                raise ValueError(f"HRVMamba: output branch {i} was pruned (prune_intermediate_layers)")
            y = xs[i]
            for j, layer in enumerate(layers):
                if j > i:
                    y = y + F.interpolate(layer(xs[j]), size=xs[i].shape[-2:], mode="bilinear", align_corners=False)
                elif j < i:
                    y = y + layer(xs[j])
            fused.append(self.fuse_acts[i](y))
        return fused


def _transition(pre: Sequence[int], cur: Sequence[int]) -> nn.ModuleList:
    """HRNet transition: adapt the existing branches' widths (3x3 conv) and grow new, coarser branches
    from the coarsest existing one (3x3 stride-2 convs)."""
    layers = []
    for i, width in enumerate(cur):
        if i < len(pre):
            layers.append(nn.Identity() if width == pre[i] else nn.Sequential(
                nn.Conv2d(pre[i], width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)))
            continue
        steps = []
        for k in range(i + 1 - len(pre)):
            out = width if k == i - len(pre) else pre[-1]
            steps.append(nn.Sequential(nn.Conv2d(pre[-1], out, 3, stride=2, padding=1, bias=False),
                                       nn.BatchNorm2d(out), nn.ReLU(inplace=True)))
        layers.append(nn.Sequential(*steps))
    return nn.ModuleList(layers)


def _bottleneck(in_chs: int, planes: int) -> nn.Module:
    """ResNet bottleneck (expansion 4) with a 1x1 conv + BN shortcut when the width changes."""
    downsample = None
    if in_chs != planes * 4:
        downsample = nn.Sequential(nn.Conv2d(in_chs, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4))
    return Bottleneck(in_chs, planes, downsample=downsample)


class ClassificationNeck(nn.Module):
    """HRNet's classification neck (mmpretrain ``HRFuseScales``): one bottleneck per branch to
    ``widths`` channels, strided 3x3 conv-BN-ReLU summing each level into the next, 1x1 to ``out_chs``."""

    def __init__(self, in_chs: Sequence[int], widths: Sequence[int] = (128, 256, 512, 1024),
                 out_chs: int = 2048) -> None:
        super().__init__()
        self.increase_layers = nn.ModuleList(nn.Sequential(_bottleneck(c, w // 4)) for c, w in zip(in_chs, widths))
        self.downsample_layers = nn.ModuleList(
            ConvNormAct(widths[i], widths[i + 1], 3, stride=2, padding=1, bias=False) for i in range(len(widths) - 1))
        self.final_layer = ConvNormAct(widths[-1], out_chs, 1, bias=False)

    def forward_levels(self, xs: List[Tensor]) -> List[Tensor]:
        """Every level's sum (strides 4-32), the last through ``final_layer``: what the official segmentation
        backbone feeds UperNet (128/256/512/2048 channels)."""
        levels = [self.increase_layers[0](xs[0])]
        for down, increase, x in zip(self.downsample_layers, self.increase_layers[1:], xs[1:]):
            levels.append(down(levels[-1]) + increase(x))
        return levels[:-1] + [self.final_layer(levels[-1])]

    def forward(self, xs: List[Tensor]) -> Tensor:
        return self.forward_levels(xs)[-1]


class HRVMamba(MambaBackbone):
    """HRVMamba classifier / multi-resolution backbone (timm model API).

    Args:
        in_chans: input image channels.
        num_classes: classifier outputs; 0 gives pooled features.
        widths: channels of the four branches (strides 4, 8, 16, 32).
        stage1_planes: bottleneck width of stage 1 (its output has 4x as many channels).
        num_modules: exchange modules in stages 2, 3 and 4.
        depth: DVSS blocks per branch per module.
        stem_width: channels of the two stem convs.
        d_state: SSM state size.
        ssm_ratio: DSS2D inner width.
        mlp_ratio: DVSS MLP width.
        ssm_drop_rate: dropout after each DSS2D.
        mlp_drop_rate: dropout in each DVSS MLP.
        multiscale_output: fuse into every branch at the end (features at 4 strides and the classifier
            neck) or only into the stride-4 branch (the pose-estimation backbone; one output, no neck).
        neck_widths: per-branch widths of the classification neck.
        num_features: output channels of the classification neck.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, increasing linearly over the blocks of stages 2-4.
        global_pool: "avg" or "" (no pooling).
        scan_backend: selective-scan backend.
        dense_features: what ``forward_intermediates`` (``features_only``) returns: "branches", the four branch maps,
            or "neck", the classification neck's four levels (128/256/512/2048 channels) each through a LayerNorm
            (``feature_norms``), as the official segmentation backbone (``Backbone_HRVMamba``, ``outnorm{i}``).
    """

    final_norm = None  # the branches are not normalised at the end

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, widths: Sequence[int] = (80, 160, 320, 640),
                 stage1_planes: int = 64, num_modules: Sequence[int] = (1, 4, 2), depth: int = 2,
                 stem_width: int = 64, d_state: int = 1, ssm_ratio: float = 2.0, mlp_ratio: float = 2.0,
                 ssm_drop_rate: float = 0.0, mlp_drop_rate: float = 0.0, multiscale_output: bool = True,
                 neck_widths: Sequence[int] = (128, 256, 512, 1024), num_features: int = 2048,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.2, global_pool: str = "avg",
                 scan_backend: str = "auto", dense_features: str = "branches") -> None:
        super().__init__()
        self.in_chans = in_chans
        if dense_features not in ("branches", "neck") or dense_features == "neck" and not multiscale_output:
            raise ValueError(f"HRVMamba: dense_features must be 'branches' or 'neck' (the latter with "
                             f"multiscale_output=True), got {dense_features!r}")
        if len(widths) != len(num_modules) + 1:
            raise ValueError(f"HRVMamba: {len(widths)} branch widths need {len(widths) - 1} stages, "
                             f"got num_modules={tuple(num_modules)}")
        self.widths, self.multiscale_output = tuple(widths), multiscale_output
        self.conv1 = nn.Conv2d(in_chans, stem_width, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.conv2 = nn.Conv2d(stem_width, stem_width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(stem_width)
        self.act = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(_bottleneck(stem_width, stage1_planes),
                                    _bottleneck(stage1_planes * 4, stage1_planes))
        block_kwargs = dict(d_state=d_state, ssm_ratio=ssm_ratio, mlp_ratio=mlp_ratio, ssm_drop_rate=ssm_drop_rate,
                            mlp_drop_rate=mlp_drop_rate, scan_backend=scan_backend)
        total = depth * sum(num_modules)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        pre, start = [stage1_planes * 4], 0
        for s, modules in enumerate(num_modules):
            cur = list(widths[: s + 2])
            setattr(self, f"transition{s + 1}", _transition(pre, cur))
            stage = []
            for m in range(modules):
                last = s == len(num_modules) - 1 and m == modules - 1
                stage.append(HRVMambaModule(cur, depth, rates[start: start + depth],
                                            multiscale_output or not last, **block_kwargs))
                start += depth
            setattr(self, f"stage{s + 2}", nn.Sequential(*stage))
            pre = cur
        self.num_stages = len(num_modules)
        self.dense_features = dense_features
        if dense_features == "neck":
            outputs = [*neck_widths[:-1], num_features]
            modules = ["neck"] * len(outputs)
            self._init_feature_norms(outputs)
        else:
            outputs = widths if multiscale_output else widths[:1]
            last_module = f"stage{self.num_stages + 1}.{num_modules[-1] - 1}"
            modules = [f"{last_module}.fuse_acts.{i}" for i in range(len(outputs))]
        self.feature_info = [dict(num_chs=w, reduction=4 * 2 ** i, module=module)
                             for i, (w, module) in enumerate(zip(outputs, modules))]
        self.neck = ClassificationNeck(widths, neck_widths, num_features) if multiscale_output else None
        self._init_classifier(num_features if multiscale_output else widths[0], num_classes, drop_rate, global_pool)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """The official classification init: truncated-normal linears (DCNv4's offset/mask projection
        included); convs, norms and SSM parameters keep their defaults."""
        init_linear_trunc_normal(module)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        # Ordinals (stage, module): stage 1 is layer1; transition k sits between stages k and k + 1.
        return dict(stem=r"^conv[12]|^bn[12]", blocks=[
            (r"^layer(1)" if coarse else r"^layer(1)\.(\d+)", None),
            (r"^stage(\d+)" if coarse else r"^stage(\d+)\.(\d+)", None),
            (r"^transition(\d+)", (99,)), (r"^neck", (99999,))])

    def forward_branches(self, x: Tensor, outputs: Optional[List[int]] = None) -> List[Tensor]:
        """Stem, stage 1 and the multi-resolution stages; the final maps of the output branches ``outputs``
        (all by default), in that order."""
        x = self.layer1(self.act(self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))))
        xs = [x]
        for s in range(self.num_stages):
            transition = getattr(self, f"transition{s + 1}")
            xs = [layer(xs[i] if i < len(xs) else xs[-1]) for i, layer in enumerate(transition)]
            modules = getattr(self, f"stage{s + 2}")
            for module in modules[:-1]:
                xs = module(xs)
            xs = modules[-1](xs, outputs if s == self.num_stages - 1 else None)
        return xs

    def _forward_levels(self, x: Tensor, indices: List[int], stop_early: bool) -> Tuple[List[Tensor], List[Tensor]]:
        """Every branch is computed even with ``stop_early`` (the exchange units need them all); the last
        exchange unit fuses into the requested levels and what ``_finish_features`` needs: every branch
        for the neck, else the last level. With ``dense_features="neck"`` the levels are the neck's."""
        if self.dense_features == "neck":
            levels = self.neck.forward_levels(self.forward_branches(x))
            return levels, [levels[i] for i in indices]
        last = len(self.feature_info) - 1
        outputs = list(range(last + 1)) if self.neck is not None else sorted(set(indices) | {last})
        xs = self.forward_branches(x, outputs)
        return xs, [xs[outputs.index(i)] for i in indices]

    def _finish_features(self, state: List[Tensor]) -> Tensor:
        """The classification neck's stride-32 map, or without a neck the last output branch (the stride-4
        branch of the pose model, the last kept level of a pruned model); NCHW. With ``dense_features="neck"``
        the state is the neck's levels, whose last is its output."""
        if self.dense_features == "neck":
            return state[-1]
        return self.neck(state) if self.neck is not None else state[-1]

    def _prune_levels(self, indices: List[int], prune_head: bool) -> bool:
        """Once the neck goes (with the head, or when the last level does: it needs every branch), the last
        exchange unit stops fusing into the branches other than ``indices``; every branch still feeds it.
        The neck's levels (``dense_features="neck"``) need every branch and the neck: nothing goes."""
        if self.dense_features == "neck" or indices[-1] == len(self.feature_info) - 1 and not prune_head:
            return False
        getattr(self, f"stage{self.num_stages + 1}")[-1].drop_outputs(indices)
        self.feature_info = self.feature_info[: indices[-1] + 1]
        return True

    def _prune_head(self) -> None:
        """The classification neck goes with the head; the features are then the last output branch (with
        ``dense_features="neck"`` the neck stays: its levels are the features)."""
        if self.dense_features == "neck":
            super()._prune_head()
            return
        self.neck = None
        self.num_features = self.head_hidden_size = self.feature_info[-1]["num_chs"]
        super()._prune_head()


# Official key -> ours, applied in order with ``re.sub``. Only the DVSS blocks differ: official
# ``norm0`` / ``conv2d.{0..3}`` (ESInB), ``norm`` (before DSS2D) and ``op`` (DSS2D, its DCNv4 named
# ``op.conv2d``) are ours ``local.norm`` / ``local.convs.{0..3}``, ``norm1`` and ``mixer`` (SSM
# parameters under ``mixer.ssm``). Stem, stage 1, transitions, exchange units, neck and head keep their names.
OFFICIAL_KEY_RULES: KeyRules = [
    (r"(\.branches\.\d+\.\d+)\.norm0\.", r"\1.local.norm."),
    (r"(\.branches\.\d+\.\d+)\.conv2d\.(\d+)\.", r"\1.local.convs.\2."),
    (r"(\.branches\.\d+\.\d+)\.norm\.", r"\1.norm1."),
    (r"\.op\.(x_proj_weight|dt_projs_weight|dt_projs_bias|A_logs|Ds)$", r".mixer.ssm.\1"),
    (r"\.op\.", ".mixer."),
    (r"^outnorm(\d+)\.", r"feature_norms.\1."),  # the segmentation backbone's per-level norms
]


def rename_official_key(key: str) -> str:
    """One official key in our layout, using ``OFFICIAL_KEY_RULES``."""
    return rename_key(key, OFFICIAL_KEY_RULES)


def _backbone_weights(checkpoint: Dict) -> Dict[str, Tensor]:
    """The backbone state dict inside a checkpoint, without DDP prefixes.

    Classification checkpoints hold it under ``model``; mmpose/mmseg ones under ``state_dict`` with a
    ``backbone.`` prefix next to the task head's keys, which are dropped.
    """
    state_dict = unwrap_state_dict(checkpoint)
    if any(k.startswith("backbone.") for k in state_dict):
        state_dict = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    return state_dict


def checkpoint_filter_fn(state_dict: Dict, model: nn.Module) -> Dict[str, Tensor]:
    """Convert a released HRVMamba checkpoint to this module's keys (no shape changes needed).

    A state dict already in our layout passes through unchanged. The classification neck and head are
    dropped when the model has none (a features-only or ``num_classes=0`` model), and so are the exchange
    layers that pruning removed. Pose checkpoints
    match ``multiscale_output=False`` models; loading them into the default (multiscale) model leaves
    the extra exchange layers of the last module and the neck to be trained.
    """
    state_dict = _backbone_weights(state_dict)
    if not any(".local.convs." in k for k in state_dict):
        state_dict = {rename_official_key(k): v for k, v in state_dict.items()}
    if getattr(model, "neck", None) is None:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("neck.")}
    pruned = tuple(f"{name}.fuse_layers.{i}." for name, module in model.named_modules()
                   if isinstance(module, HRVMambaModule) for i, layers in enumerate(module.fuse_layers) if not layers)
    if pruned:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(pruned)}
    if not isinstance(getattr(model, "head", None), nn.Linear):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    return with_own_weights(state_dict, model, "feature_norms.")


def _create_hrvmamba(variant: str, pretrained: bool = False, **kwargs) -> HRVMamba:
    default_indices = (0, 1, 2, 3) if kwargs.get("multiscale_output", True) else (0,)
    kwargs.setdefault("out_indices", default_indices)
    return build_backbone(HRVMamba, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def _cfg(**kwargs) -> dict:
    # The repository has no LICENSE file.
    return imagenet_cfg(**{"first_conv": "conv1", "license": "unknown", "paper_ids": "arXiv:2410.03174", **kwargs})


default_cfgs = generate_default_cfgs({
    # Checkpoints (pose: COCO 256x192 / 384x288, classification: ImageNet-1k) are Google Drive links in
    # the README, so no download source is set: fetch the file by hand and convert it with
    # ``checkpoint_filter_fn``. The pose checkpoints need ``multiscale_output=False``.
    "hrvmamba_tiny.coco_pose": _cfg(input_size=(3, 256, 192), pool_size=(8, 6)),
    "hrvmamba_small.in1k": _cfg(input_size=(3, 256, 256), pool_size=(8, 8)),
    "hrvmamba_small.coco_pose": _cfg(input_size=(3, 256, 192), pool_size=(8, 6)),
    "hrvmamba_base.in1k": _cfg(),
    "hrvmamba_base.coco_pose": _cfg(input_size=(3, 256, 192), pool_size=(8, 6)),
    "test_hrvmamba.untrained": _cfg(input_size=(3, 32, 32), pool_size=(1, 1), license="apache-2.0"),
})


@register_model
def hrvmamba_tiny(pretrained: bool = False, **kwargs) -> HRVMamba:
    """HRVMamba-Tiny (branch widths 16/32/64/128): 2.151 M parameters as the pose backbone.

    Pose backbone (``multiscale_output=False``, ``features_only=True``): 2,151,008 parameters, measured
    by building the official COCO config (td-hm_hrvmamba_tiny_8xb32-210e_coco-256x192.py) with the DCNv4
    build the models were trained with; README: 2 M, COCO AP 69.5. The official ImageNet "Tiny" is a
    different model (``HRVmamba_se_lpu``), not reproduced here.
    """
    args = dict(widths=(16, 32, 64, 128), stage1_planes=32, drop_path_rate=0.0)
    return _create_hrvmamba("hrvmamba_tiny", pretrained, **dict(args, **kwargs))


@register_model
def hrvmamba_small(pretrained: bool = False, **kwargs) -> HRVMamba:
    """HRVMamba-Small (branch widths 32/64/128/256): 8.034 M parameters as the pose backbone.

    Pose backbone: 8,033,840 parameters (measured from the official COCO config; README 8 M, AP 74.6).
    Classifier (default): 20,101,976 parameters (measured from classification/models/build.py;
    README 20 M, 81.3 % top-1 at 256x256).
    """
    args = dict(widths=(32, 64, 128, 256), stage1_planes=64, drop_path_rate=0.1)
    return _create_hrvmamba("hrvmamba_small", pretrained, **dict(args, **kwargs))


@register_model
def hrvmamba_base(pretrained: bool = False, **kwargs) -> HRVMamba:
    """HRVMamba-Base (branch widths 80/160/320/640): 60.549 M parameters as the classifier.

    Classifier (default): 60,548,520 parameters (measured from classification/models/build.py; README
    61 M, 84.2 % top-1). Pose backbone: 47,099,616 parameters (measured from the official COCO config;
    README 47 M, AP 76.5 at 256x192).
    """
    args = dict(widths=(80, 160, 320, 640), stage1_planes=64, drop_path_rate=0.2)
    return _create_hrvmamba("hrvmamba_base", pretrained, **dict(args, **kwargs))


@register_model
def test_hrvmamba(pretrained: bool = False, **kwargs) -> HRVMamba:
    """Smallest HRVMamba for tests (timm's ``test_*`` convention)."""
    args = dict(widths=(8, 16, 16, 32), stage1_planes=8, num_modules=(1, 1, 1), depth=1, stem_width=16,
                neck_widths=(16, 16, 32, 32), num_features=64, drop_path_rate=0.0)
    return _create_hrvmamba("test_hrvmamba", pretrained, **dict(args, **kwargs))
