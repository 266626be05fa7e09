"""Vim (Vision Mamba): a plain stack of bidirectional Mamba mixers over patch tokens (hustvl/Vim, ICML 2024).

Tokens are 16x16 patches (stride 16, or 8 for the "+" fine-tuned models) with a class token inserted in
the MIDDLE of the sequence (index M // 2 of M patches) before the absolute position embedding is added;
the classifier reads that token after the final RMSNorm. Blocks follow the Mamba language model's
Add -> Norm -> Mixer order, passing ``(hidden, residual)`` with the residual stream kept in float32, and
have no MLP.

The mixer is the released models' "v2" bidirectional Mamba: one input and one output projection, and
per direction its own causal depthwise conv1d, x/dt projections, A and D; the backward direction runs
on the reversed sequence. Here the two directions are the two routes of the shared ``BidirectionalScan``
pattern and the per-direction SSM parameters one ``RouteSSM`` with K = 2, so both directions are one
grouped scan call. Summing the gated outputs and halving them, as the released models do, equals
gating the average of the two directions, which is what ``BidirectionalScan.merge`` returns.

Dense features: ``forward_intermediates`` taps the residual stream after four blocks (the official
segmentation taps 5/11/17/23 of 24), as (B, D, H/s, W/s) maps without the class token. The residual
stream (block output added to the residual) is what the official Vim-S UperNet script feeds its neck
(``use_residual_as_feature=True``, ``last_layer_process=add``); the Vim-Ti script's default takes the
un-normalised mixer output alone (``feature_stream="hidden"``); that backbone also has no class token
(``class_token=False``: one position row per patch). Built with
``features_only=True`` the model also gets a simple feature pyramid (BEiT/ViTDet style: transposed
convs up, identity, max-pool down) that turns the taps into strides 4/8/16/32, so Vim plugs into the
same dense heads as the hierarchical families; the classifier has no pyramid (its parameter count is
the official one).

Position embeddings follow the input size: a grid other than the stored one is resampled bicubically
with the class-token row taken out at its middle position and put back at the new middle (the
official ``interpolate_pos_embed`` assumes a leading class token and mixes the middle one into the
grid; we do not copy that). ``checkpoint_filter_fn`` converts the released checkpoints, including a
stride-16 checkpoint into a stride-8 model.

Token pruning (``prune=``, Zhan et al., NeurIPS 2024; ``backbones.pruning``): after the configured blocks the
least important patch tokens are dropped (the class token never is), and in "aligned" mode the later blocks'
scans run the pruning-aware aligned recurrence over the kept tokens' unpruned positions. After the last block
the class token is moved back to the middle index, so pooling and the head are unchanged. A pruned forward
pass has no dense feature maps.
"""

from __future__ import annotations

import math
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import DropPath, lecun_normal_, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn

from ._checkpoint import unwrap_state_dict, with_own_weights
from ._features import MambaBackbone, build_backbone, imagenet_cfg
from .kernel.conv import MAX_WIDTH as MAX_CONV_WIDTH
from .kernel.conv import bidirectional_conv_silu
from .pruning import PruneConfig, gather_tokens, select_tokens, token_importance
from .scan_patterns import BidirectionalScan
from .ss2d import RouteSSM, resolve_dt_rank

__all__ = ["BiMambaMixer", "VimBlock", "VisionMamba", "checkpoint_filter_fn", "resample_pos_embed"]


class BiMambaMixer(nn.Module):
    """Vim's bidirectional ("v2") Mamba mixer on (batch, length, dim) tokens.

    Args:
        dim: token width.
        d_state: SSM state size.
        expand: inner width as a multiple of ``dim``.
        d_conv: kernel of the causal depthwise conv1d of each direction.
        dt_rank: rank of the dt projections ("auto" = ceil(dim / 16)).
        scan_backend: selective-scan backend.

    When the scan runs on the fused CPU kernel (and without pruning positions), both directions' conv + SiLU
    run as one kernel pass in token order (``backbones.kernel.conv``) and the scan gates each direction
    before its merge; otherwise the routes are copied, convolved, scanned and merged in PyTorch.
    """

    def __init__(self, dim: int, d_state: int = 16, expand: int = 2, d_conv: int = 4,
                 dt_rank: Union[int, str] = "auto", scan_backend: str = "auto") -> None:
        super().__init__()
        d_inner = expand * dim
        self.pattern = BidirectionalScan()
        routes = self.pattern.num_routes
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        # One depthwise conv over the routes' channels: route k's channels hold direction k's kernels.
        self.conv1d = nn.Conv1d(routes * d_inner, routes * d_inner, d_conv, groups=routes * d_inner,
                                padding=d_conv - 1)
        self.act = nn.SiLU()
        self.ssm = RouteSSM(d_inner, routes, d_state, resolve_dt_rank(dt_rank, dim), scan_backend=scan_backend)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

    def forward(self, x: Tensor, positions: Optional[Tensor] = None,
                with_importance: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """(batch, L, dim) -> (batch, L, dim); with ``with_importance`` also each token's pruning importance
        (batch, L) from the gated SSM output. ``positions`` (batch, L): the tokens' unpruned indices, for the
        pruning-aware aligned scan (the backward route scans them reversed)."""
        length = x.shape[1]
        x, z = self.in_proj(x).chunk(2, dim=-1)
        if self.conv1d.kernel_size[0] <= MAX_CONV_WIDTH and self.ssm.uses_fused_routes(x):
            # Both directions' conv + SiLU in one kernel pass, in the layout the fused scan reads; the scan
            # gates each direction before merging them (the mean of silu(z) * y_k is silu(z) times their mean)
            # and, for a pruned sequence, decays over the skipped positions of each route's own order.
            routes = bidirectional_conv_silu(x, self.conv1d.weight, self.conv1d.bias)
            gated = self.ssm.forward_pixels(routes, self.pattern, per_route=True, positions=positions,
                                            gate=z.transpose(1, 2))
            gated = gated.transpose(1, 2)
        else:
            routes = self.pattern.scan(x.transpose(1, 2))
            batch, num_routes, channels, _ = routes.shape
            routes = self.conv1d(routes.reshape(batch, num_routes * channels, length))[..., :length]
            routes = self.act(routes).view(batch, num_routes, channels, length)
            route_positions = None if positions is None else self.pattern.scan(positions.unsqueeze(1))[:, :, 0]
            y = self.pattern.merge(self.ssm(routes, positions=route_positions), (length,))
            gated = y.transpose(1, 2) * F.silu(z)
        out = self.out_proj(gated)
        return (out, token_importance(gated)) if with_importance else out


class VimBlock(nn.Module):
    """Add -> RMSNorm -> mixer, as the Mamba language model orders it; no MLP.

    ``forward(hidden, residual)`` adds the previous block's (drop-path'ed) output to the float32 residual
    stream, normalises it and mixes; it returns the new ``(hidden, residual)``. The first block gets
    ``residual=None`` and uses its input as the residual.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, norm_eps: float = 1e-5, **mixer_kwargs) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=norm_eps)
        self.mixer = BiMambaMixer(dim, **mixer_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, hidden: Tensor, residual: Optional[Tensor], positions: Optional[Tensor] = None,
                with_importance: bool = False) -> Tuple[Tensor, ...]:
        """``positions`` and ``with_importance`` are the mixer's (token pruning); with the latter the tokens'
        importance is returned third."""
        residual = hidden if residual is None else residual + self.drop_path(hidden)
        mixed = self.mixer(self.norm(residual.to(self.norm.weight.dtype)), positions, with_importance)
        if with_importance:
            return mixed[0], residual.float(), mixed[1]
        return mixed, residual.float()


def _pyramid_level(dim: int, scale: float) -> nn.Module:
    """Resample a (B, dim, h, w) map by ``scale`` (a power of 2): transposed convs up (BatchNorm + GELU
    between them), identity, or max-pooling down."""
    if scale == 1:
        return nn.Identity()
    if scale < 1:
        return nn.MaxPool2d(round(1 / scale))
    layers: List[nn.Module] = []
    for step in range(round(math.log2(scale))):
        if step:
            layers += [nn.BatchNorm2d(dim), nn.GELU()]
        layers.append(nn.ConvTranspose2d(dim, dim, 2, stride=2))
    return nn.Sequential(*layers)


def resample_pos_embed(pos_embed: Tensor, old_grid: Sequence[int], new_grid: Sequence[int],
                       class_token: bool = True) -> Tensor:
    """A (1, M + 1, D) position embedding with the class token at index M // 2 (or, without ``class_token``,
    a (1, M, D) one), for another patch grid.

    The class row is taken out, the M patch rows are resized bicubically as a grid, and the class row is
    put back at the new grid's middle index.
    """
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid == new_grid:
        return pos_embed
    if not class_token:
        patches = pos_embed.reshape(1, *old_grid, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches.float(), size=new_grid, mode="bicubic", align_corners=False)
        return patches.flatten(2).transpose(1, 2).to(pos_embed.dtype)
    old_middle = old_grid[0] * old_grid[1] // 2
    cls_row = pos_embed[:, old_middle: old_middle + 1]
    patches = torch.cat((pos_embed[:, :old_middle], pos_embed[:, old_middle + 1:]), dim=1)
    patches = patches.reshape(1, *old_grid, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), size=new_grid, mode="bicubic", align_corners=False)
    patches = patches.flatten(2).transpose(1, 2).to(pos_embed.dtype)
    new_middle = new_grid[0] * new_grid[1] // 2
    return torch.cat((patches[:, :new_middle], cls_row, patches[:, new_middle:]), dim=1)


class PatchEmbed(nn.Module):
    """Conv patchify: (B, C, H, W) -> (B, D, (H - p) // s + 1, (W - p) // s + 1)."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, stride: int) -> None:
        super().__init__()
        self.patch_size, self.stride = patch_size, stride
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=stride)

    def grid(self, height: int, width: int) -> Tuple[int, int]:
        if min(height, width) < self.patch_size:
            raise ValueError(f"Vim: input {height}x{width} is smaller than one {self.patch_size}-pixel patch")
        return (height - self.patch_size) // self.stride + 1, (width - self.patch_size) // self.stride + 1

    def forward(self, x: Tensor) -> Tensor:
        self.grid(*x.shape[-2:])  # refuses inputs smaller than one patch
        return self.proj(x)


class VisionMamba(MambaBackbone):
    """Vim image classifier / plain backbone (timm model API).

    Args:
        img_size: input size (int or (height, width)) the position embedding is stored for; other sizes
            are resampled.
        patch_size: patch side.
        stride: patch stride (16, or 8 for the "+" models).
        in_chans: input image channels.
        num_classes: classifier outputs; 0 gives pooled features.
        embed_dim: token width D.
        depth: number of blocks.
        d_state: SSM state size.
        expand: mixer inner width as a multiple of D.
        drop_rate: dropout after the position embedding and before the head.
        drop_path_rate: stochastic depth; block i gets linspace(0, rate, depth)[i - 1] (block 0 none), and
            the last block's output gets ``rate``, as the official model does.
        global_pool: "token" (the middle class token, as released), "avg" (mean of the patch tokens) or
            "" (all tokens); by default "token" with a class token, else "avg".
        feature_taps: blocks whose output ``forward_intermediates`` returns (default: the last block of each
            quarter, i.e. 5/11/17/23 for 24 blocks).
        feature_pyramid: add the stride-4/8/16/32 pyramid over the taps (set for ``features_only``).
        scan_backend: selective-scan backend.
        class_token: the middle class token (released classifiers); without it, as the official Vim-Ti
            segmentation backbone (``VisionMambaSeg``, ``if_cls_token=False``), there is no class token and the
            position embedding has one row per patch (``global_pool`` must then not be "token").
        feature_stream: what a tap returns: "residual", the residual stream after the block (the official Vim-S
            UperNet's ``use_residual_as_feature=True``), or "hidden", the block's mixer output alone (the
            official Vim-Ti UperNet).
        prune: token pruning (``backbones.pruning.PruneConfig`` or a mapping of its fields: keep_ratio, layers,
            mode "aligned"/"naive", train), or None.
    """

    global_pools = ("token", "avg", "")
    final_norm = "norm_f"
    level_modules = False  # the levels are sums of the residual stream between blocks

    def __init__(self, img_size: Union[int, Sequence[int]] = 224, patch_size: int = 16, stride: int = 16,
                 in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 192, depth: int = 24,
                 d_state: int = 16, expand: int = 2, drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 global_pool: Optional[str] = None,
                 feature_taps: Optional[Sequence[int]] = None, feature_pyramid: bool = False,
                 scan_backend: str = "auto", class_token: bool = True, feature_stream: str = "residual",
                 prune: Union[None, PruneConfig, Dict] = None) -> None:
        super().__init__()
        self.prune = PruneConfig.parse(prune, depth)
        if self.prune is not None and feature_pyramid:
            raise ValueError("Vim: prune=... keeps only some tokens, so there are no dense feature maps for "
                             "features_only / feature_pyramid; build the dense backbone with prune=None")
        if feature_stream not in ("residual", "hidden"):
            raise ValueError(f"Vim: feature_stream must be 'residual' or 'hidden', got {feature_stream!r}")
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.feature_stream = feature_stream
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size, stride)
        self.grid = self.patch_embed.grid(*to_2tuple(img_size))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] + class_token, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = [0.0] + [drop_path_rate * i / max(depth - 1, 1) for i in range(depth - 1)]
        self.layers = nn.ModuleList(VimBlock(embed_dim, rates[i], d_state=d_state, expand=expand,
                                             scan_backend=scan_backend) for i in range(depth))
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm_f = nn.RMSNorm(embed_dim, eps=1e-5)
        if global_pool is None:
            global_pool = "token" if class_token else "avg"
        self._init_classifier(embed_dim, num_classes, drop_rate, global_pool)
        self.feature_taps = list(feature_taps or [depth * (q + 1) // 4 - 1 for q in range(4)])
        self.grad_checkpointing = False
        if feature_pyramid:
            # Keyed by level (a ModuleList's state-dict names), so that pruning can drop levels.
            self.feature_pyramid = nn.ModuleDict({str(level): _pyramid_level(embed_dim, stride / r)
                                                  for level, r in enumerate((4, 8, 16, 32))})
            reductions = [4, 8, 16, 32]
        else:
            self.feature_pyramid, reductions = None, [stride] * len(self.feature_taps)
        self.feature_info = [dict(num_chs=embed_dim, reduction=r, module=f"layers.{tap}")
                             for r, tap in zip(reductions, self.feature_taps)]
        self._init_weights(depth)

    @torch.no_grad()
    def _init_weights(self, depth: int) -> None:
        """The official init: trunc-normal tokens and head, LeCun-normal patch conv, zero linear biases
        (the dt biases keep Mamba's init), and Mamba's rescaled out_proj (kaiming-uniform / sqrt(depth))."""
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        for block in self.layers:
            nn.init.kaiming_uniform_(block.mixer.out_proj.weight, a=math.sqrt(5))
            block.mixer.out_proj.weight /= math.sqrt(depth)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token"} | super().no_weight_decay()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed", blocks=[(r"^layers\.(\d+)", None),
                                                                         (r"^norm_f", (99999,))])

    def _checked_pool(self, global_pool: str) -> str:
        if global_pool == "token" and self.cls_token is None:
            raise ValueError("VisionMamba: global_pool 'token' needs the class token (class_token=True); "
                             "use 'avg' or ''")
        return super()._checked_pool(global_pool)

    def _tokens(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        """Patch tokens with the class token (if any) at the middle index and the position embedding added."""
        x = self.patch_embed(x)
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            middle = x.shape[1] // 2
            x = torch.cat((x[:, :middle], self.cls_token.expand(x.shape[0], -1, -1), x[:, middle:]), dim=1)
        pos_embed = resample_pos_embed(self.pos_embed, self.grid, grid, self.cls_token is not None)
        return self.pos_drop(x + pos_embed), grid

    def _run_block(self, block: VimBlock, hidden: Tensor, residual: Optional[Tensor],
                   *pruning: Union[Optional[Tensor], bool]) -> Tuple[Tensor, ...]:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return torch.utils.checkpoint.checkpoint(block, hidden, residual, *pruning, use_reentrant=False)
        return block(hidden, residual, *pruning)

    def _forward_pruned(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """All blocks with token pruning after ``prune.layers``; (hidden, residual) with the class token moved
        back to the middle index. Until a step actually drops a token the scans are the unpruned ones."""
        hidden, _ = self._tokens(x)
        batch, length = hidden.shape[:2]
        positions = torch.arange(length, device=hidden.device).expand(batch, -1)
        cls_position = (length - 1) // 2 if self.cls_token is not None else None  # M // 2 of M patches
        cls_index = None if cls_position is None else positions[:, cls_position]
        ratios = dict(zip(self.prune.layers, self.prune.keep_ratio))
        aligned = self.prune.mode == "aligned"
        residual = None
        for index, block in enumerate(self.layers):
            scan_positions = positions if aligned and positions.shape[1] < length else None
            out = self._run_block(block, hidden, residual, scan_positions, index in ratios)
            hidden, residual = out[0], out[1]
            if index in ratios:
                kept = select_tokens(out[2], ratios[index], cls_index)
                hidden, residual, positions = (gather_tokens(t, kept) for t in (hidden, residual, positions))
                if cls_position is not None:
                    cls_index = (positions < cls_position).sum(1)
        if cls_index is not None:
            hidden, residual = (self._class_to_middle(t, cls_index) for t in (hidden, residual))
        return hidden, residual

    @staticmethod
    def _class_to_middle(tokens: Tensor, cls_index: Tensor) -> Tensor:
        """Move each sample's class token (at ``cls_index``) to index (L - 1) // 2, the others keeping their order."""
        length = tokens.shape[1]
        order = torch.arange(length, device=tokens.device).expand(tokens.shape[0], -1)
        key = (order - (order > cls_index[:, None]).long()).float()  # rank among the other tokens
        key = key.masked_fill(order == cls_index[:, None], (length - 1) // 2 - 0.5)
        return gather_tokens(tokens, key.argsort(dim=1, stable=True))

    def _forward_levels(self, x: Tensor, indices: List[int],
                        stop_early: bool) -> Tuple[Tuple[Tensor, Tensor], List[Tensor]]:
        """The residual stream (or, with ``feature_stream="hidden"``, the mixer output) after the tap blocks of
        ``indices`` as NCHW maps without the class token, through the feature pyramid when the model has one."""
        if self.feature_pyramid is not None and any(str(i) not in self.feature_pyramid for i in indices):
            raise ValueError(f"Vim: levels {indices} asked for, but only {list(self.feature_pyramid)} are left "
                             "after prune_intermediate_layers")
        if self.prune is not None and self.prune.active(self.training):
            if indices:
                raise ValueError("Vim: a model with token pruning (prune=...) has no dense feature maps; build it "
                                 "with prune=None for forward_intermediates / features_only")
            return self._forward_pruned(x), []
        taps = {self.feature_taps[i]: i for i in indices}
        last_block = self.feature_taps[indices[-1]] if stop_early else len(self.layers) - 1
        hidden, grid = self._tokens(x)
        residual, maps = None, []
        for index, block in enumerate(self.layers[: last_block + 1]):
            hidden, residual = self._run_block(block, hidden, residual)
            if index in taps:
                tokens = residual + hidden if self.feature_stream == "residual" else hidden
                if self.cls_token is not None:
                    middle = tokens.shape[1] // 2
                    tokens = torch.cat((tokens[:, :middle], tokens[:, middle + 1:]), dim=1)
                feature = tokens.transpose(1, 2).reshape(x.shape[0], -1, *grid)
                maps.append(self.feature_pyramid[str(taps[index])](feature) if self.feature_pyramid is not None
                            else feature)
        return (hidden, residual), maps

    def _finish_features(self, state: Tuple[Tensor, Tensor]) -> Tensor:
        """All tokens after the final add and norm, (B, M + 1, D) with the class token at index M // 2 (or
        (B, M, D) without one)."""
        hidden, residual = state
        return self.norm_f((residual + self.drop_path(hidden)).to(hidden.dtype))

    def _prune_levels(self, indices: List[int], prune_head: bool) -> bool:
        """The blocks after the last kept tap and the other levels' pyramid go; the final norm and head
        still fit (same width)."""
        index = indices[-1]
        self.layers = self.layers[: self.feature_taps[index] + 1]
        if self.feature_pyramid is not None:
            for level in [level for level in self.feature_pyramid if int(level) not in indices]:
                del self.feature_pyramid[level]
        self.feature_info = self.feature_info[: index + 1]
        return False

    def _pool(self, x: Tensor) -> Tensor:
        """(B, M + 1, D) tokens -> the middle class token ("token"), the mean of the others ("avg"), or all;
        without a class token "avg" is the mean of all tokens."""
        middle = (x.shape[1] - 1) // 2
        if self.global_pool == "token":
            return x[:, middle]
        if self.global_pool == "avg" and self.cls_token is not None:
            return torch.cat((x[:, :middle], x[:, middle + 1:]), dim=1).mean(dim=1)
        if self.global_pool == "avg":
            return x.mean(dim=1)
        return x


# Official per-direction mixer tensors -> our stacked RouteSSM / grouped conv (forward route first).
_STACKED = {"x_proj.weight": ("ssm.x_proj_weight", torch.stack),
            "dt_proj.weight": ("ssm.dt_projs_weight", torch.stack),
            "dt_proj.bias": ("ssm.dt_projs_bias", torch.stack), "A_log": ("ssm.A_logs", torch.cat),
            "D": ("ssm.Ds", torch.cat), "conv1d.weight": ("conv1d.weight", torch.cat),
            "conv1d.bias": ("conv1d.bias", torch.cat)}


def _backward_name(name: str) -> str:
    """The official name of the backward direction's tensor: ``A_log`` -> ``A_b_log``, ``D`` -> ``D_b``,
    ``x_proj.weight`` -> ``x_proj_b.weight``."""
    if name == "A_log":
        return "A_b_log"
    if name == "D":
        return "D_b"
    module, param = name.split(".")
    return f"{module}_b.{param}"


def checkpoint_filter_fn(state_dict: Dict, model: VisionMamba) -> Dict[str, Tensor]:
    """Convert a released Vim checkpoint (``{'model': ..., 'args': Namespace}``) or the backbone of the official
    UperNet (``VisionMambaSeg``, mmseg 0.x) to this module's keys.

    Top-level names (``patch_embed``, ``cls_token``, ``pos_embed``, ``layers.i.{norm,mixer.in_proj,
    mixer.out_proj}``, ``norm_f``, ``head``) are kept; each block's forward/backward tensors
    (``x_proj``/``x_proj_b``, ``dt_proj``/``dt_proj_b``, ``A_log``/``A_b_log``, ``D``/``D_b``,
    ``conv1d``/``conv1d_b``) are stacked into the two routes; the segmentation backbone's ``fpn1``-``fpn4`` are
    our ``feature_pyramid.0``-``3``. The position embedding is resampled when the model's grid differs (a
    stride-16 checkpoint into a stride-8 model), and its class row is taken out for a model without a class
    token. A model with a feature pyramid keeps its own (initial) pyramid weights where the file has none; a
    feature extractor (no final norm) drops ``norm_f``. The rotary-embedding buffers some files carry
    (``rope.*``, fixed functions of the grid, saved whether or not the model used them) are dropped: a model
    trained with ``if_rope=True`` (the official Vim-S UperNet) is not what this module computes. A state dict
    already in our layout passes through.
    """
    state_dict = unwrap_state_dict(state_dict)
    if any(".mixer.ssm." in key for key in state_dict):
        return with_own_weights(state_dict, model, "feature_pyramid.")
    out: Dict[str, Tensor] = {}
    backward_names = {_backward_name(name) for name in _STACKED}
    for key, value in state_dict.items():
        prefix, _, name = key.partition(".mixer.")
        if name in _STACKED:
            target, join = _STACKED[name]
            out[f"{prefix}.mixer.{target}"] = join((value, state_dict[f"{prefix}.mixer.{_backward_name(name)}"]))
        elif name not in backward_names and not key.startswith("rope."):
            out[re.sub(r"^fpn(\d)\.", lambda m: f"feature_pyramid.{int(m[1]) - 1}.", key)] = value
    if not isinstance(getattr(model, "norm_f", None), nn.RMSNorm):  # a feature extractor has no final norm
        out.pop("norm_f.weight", None)
    if "pos_embed" in out:
        has_class = "cls_token" in out
        if model.cls_token is not None and not has_class:
            raise ValueError("Vim checkpoint: the file has no class token (a segmentation backbone); build the "
                             "model with class_token=False")
        stored = out["pos_embed"].shape[1] - has_class
        side = math.isqrt(stored)
        if side * side != stored:
            raise ValueError(f"Vim checkpoint: pos_embed has {stored} patch rows, not a square grid")
        pos_embed = resample_pos_embed(out["pos_embed"], (side, side), model.grid, has_class)
        if has_class and model.cls_token is None:
            middle = model.grid[0] * model.grid[1] // 2
            pos_embed = torch.cat((pos_embed[:, :middle], pos_embed[:, middle + 1:]), dim=1)
            del out["cls_token"]
        out["pos_embed"] = pos_embed
    return with_own_weights(out, model, "feature_pyramid.")


def _create_vim(variant: str, pretrained: bool = False, **kwargs) -> VisionMamba:
    kwargs.setdefault("feature_pyramid", bool(kwargs.get("features_only")))
    return build_backbone(VisionMamba, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def _cfg(**kwargs) -> dict:
    return imagenet_cfg(**{"first_conv": "patch_embed.proj", "classifier": "head", "pool_size": None,
                           "license": "apache-2.0", "paper_ids": "arXiv:2401.09417", **kwargs})


default_cfgs = generate_default_cfgs({
    "vim_tiny_patch16_224.in1k": _cfg(hf_hub_id="hustvl/Vim-tiny-midclstok",
                                      hf_hub_filename="vim_t_midclstok_76p1acc.pth"),
    "vim_small_patch16_224.in1k": _cfg(hf_hub_id="hustvl/Vim-small-midclstok",
                                       hf_hub_filename="vim_s_midclstok_80p5acc.pth"),
    "vim_base_patch16_224.in1k": _cfg(hf_hub_id="hustvl/Vim-base-midclstok",
                                      hf_hub_filename="vim_b_midclstok_81p9acc.pth"),
    "vim_tiny_patch16_stride8_224.in1k": _cfg(hf_hub_id="hustvl/Vim-tiny-midclstok",
                                              hf_hub_filename="vim_t_midclstok_ft_78p3acc.pth"),
    "vim_small_patch16_stride8_224.in1k": _cfg(hf_hub_id="hustvl/Vim-small-midclstok",
                                               hf_hub_filename="vim_s_midclstok_ft_81p6acc.pth"),
    "test_vim.untrained": _cfg(input_size=(3, 32, 32)),
})


@register_model
def vim_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-Ti: 7.148 M parameters (measured official build, README 7 M), 76.1 % top-1."""
    args = dict(embed_dim=192, depth=24, drop_path_rate=0.0)
    return _create_vim("vim_tiny_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def vim_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-S: 25.797 M parameters (measured official build, README 26 M), 80.5 % top-1."""
    args = dict(embed_dim=384, depth=24, drop_path_rate=0.05)
    return _create_vim("vim_small_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def vim_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-B: 97.598 M parameters (measured official build, README 98 M), 81.9 % top-1."""
    args = dict(embed_dim=768, depth=24, drop_path_rate=0.1)
    return _create_vim("vim_base_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def vim_tiny_patch16_stride8_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-Ti+ (patch stride 8, 729 tokens): 7.250 M parameters (measured official build), 78.3 % top-1."""
    args = dict(embed_dim=192, depth=24, stride=8, drop_path_rate=0.0)
    return _create_vim("vim_tiny_patch16_stride8_224", pretrained, **dict(args, **kwargs))


@register_model
def vim_small_patch16_stride8_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-S+ (patch stride 8, 729 tokens): 26.001 M parameters (measured official build), 81.6 % top-1."""
    args = dict(embed_dim=384, depth=24, stride=8, drop_path_rate=0.0)
    return _create_vim("vim_small_patch16_stride8_224", pretrained, **dict(args, **kwargs))


@register_model
def test_vim(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Smallest Vim for tests (timm's ``test_*`` convention): D 16, 4 blocks, 32x32 input."""
    args = dict(img_size=32, embed_dim=16, depth=4, d_state=4, drop_path_rate=0.0)
    return _create_vim("test_vim", pretrained, **dict(args, **kwargs))
