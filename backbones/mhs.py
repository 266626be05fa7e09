"""Multi-Head Scan (MHS-VM, arXiv 2406.05992): selective scans in parallel subspaces along different routes.

Facts from the official code (PixDeep/MHS-VM, ``models/vmunet/mhsm.py``, ``scanutils.py``, ``routegen.py``):
the MHS module projects its ``d`` input channels without bias onto ``h`` subspaces (heads) of ``d // h``
channels. Each head runs a selective scan (Mamba parameters without expansion, dt rank ``ceil((d // h) / 16)``)
over K = 4 sequences: route 0, route 0 reversed, route 1, route 1 reversed, with the route pair of its own
pattern:

- C: boustrophedon rows (odd rows right to left), then boustrophedon columns (odd columns bottom to top);
- X: the zigzag over anti-diagonals from the top-left corner (first step to the right), and its left-right mirror;
- S: the clockwise spiral from the top-left corner inwards, and its top-bottom mirror;
- Z: row-major, then column-major.

Three heads use C, X, S; four heads C, X, S, Z. The four outputs of a head, each back in row-major order, are
fused by the *scan route attention* (the code's ``GFU``): ``y = sum_k y_k * ReLU(cv - t)`` with the relative
coefficient of variation ``cv = std_k(y) / (mean_k(y - min_k y) + 1e-5)`` (``std`` unbiased, over the K
routes, per channel and pixel) and a fixed threshold ``t`` (0.5 for ISIC 2018, 0 for ISIC 2017). The heads
are concatenated, layer-normed and projected back to ``d`` channels (``with_proj``). The module replaces the
scan of VMamba's gated mixer (``VSSGate``): ``in_proj`` to ``2d`` without bias, depthwise 3x3 conv with bias,
SiLU, MHS, LayerNorm, times ``SiLU(z)``, no output projection. MHS-VM is VM-UNet (encoder depths 2-2-2-2,
decoder 2-2-2-1, dims 96-768, drop path 0.2, d_state 16) with these mixers, trained from scratch.

Written here from those facts: the routes are computed for any map size (the official code loads tables
precomputed for 256x256 inputs; ours equal them there), each head's routes are a ``RouteTable`` scan pattern
and its scans one ``RouteSSM`` (SS2D's per-route SSM parameters).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict, Union

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn

from ._checkpoint import VMAMBA_KEY_RULES, KeyRules, drop_aliases, rename_key, unwrap_state_dict, with_own_weights
from ._features import build_backbone, imagenet_cfg
from .hierarchical import HierarchicalMamba
from .layers import PatchMerging, PatchStem, VSSBlock
from .scan_patterns import RouteTable
from .ss2d import RouteSSM, resolve_dt_rank

__all__ = ["MHS_ROUTES", "MIXER_KEY_RULES", "OFFICIAL_ALIASES", "OFFICIAL_KEY_RULES", "MultiHeadScan",
           "MultiHeadScanMixer", "ScanHead", "ScanRouteAttention", "checkpoint_filter_fn", "official_encoder"]


def _pixels(height: int, width: int) -> Tensor:
    return torch.arange(height * width, device="cpu").view(height, width)


def snake_routes(height: int, width: int) -> Tensor:
    """C: rows with every odd row right to left, then columns with every odd column bottom to top."""
    def snake(grid: Tensor) -> Tensor:
        grid = grid.clone()
        grid[1::2] = grid[1::2].flip(-1)
        return grid.flatten()

    pixels = _pixels(height, width)
    return torch.stack((snake(pixels), snake(pixels.t())))


def zigzag_routes(height: int, width: int) -> Tensor:
    """X: anti-diagonals from the top-left corner, rows rising on odd diagonals and falling on even ones (so
    the first step goes right), then the same route mirrored left to right."""
    pixels = _pixels(height, width).flatten()
    rows, cols = pixels // width, pixels % width
    diagonal = rows + cols
    order = (diagonal * height + torch.where(diagonal % 2 == 1, rows, height - 1 - rows)).argsort()
    rows, cols = rows[order], cols[order]
    return torch.stack((rows * width + cols, rows * width + (width - 1 - cols)))


def spiral_routes(height: int, width: int) -> Tensor:
    """S: the clockwise spiral from the top-left corner inwards, then the same route mirrored top to bottom.

    Built by peeling: take the top row, turn what remains a quarter anticlockwise, repeat.
    """
    remaining, steps = _pixels(height, width), []
    while remaining.numel():
        steps.append(remaining[0])
        remaining = remaining[1:].t().flip(0)
    route = torch.cat(steps)
    return torch.stack((route, (height - 1 - route // width) * width + route % width))


def raster_routes(height: int, width: int) -> Tensor:
    """Z: row-major, then column-major."""
    pixels = _pixels(height, width)
    return torch.stack((pixels.flatten(), pixels.t().flatten()))


# One head per letter; the official 3-head model is "CXS", the 4-head model "CXSZ".
MHS_ROUTES: Dict[str, Callable[[int, int], Tensor]] = {
    "C": snake_routes, "X": zigzag_routes, "S": spiral_routes, "Z": raster_routes}


class ScanRouteAttention(nn.Module):
    """MHS-VM's fusion of a head's K route outputs: ``sum_k y_k * ReLU(cv - threshold)``.

    ``cv = std_k(y) / (mean_k(y - min_k y) + eps)`` is the relative coefficient of variation over the routes
    (unbiased std), per channel and pixel: where the routes agree the sum is damped or cut, where they differ
    it passes. For K routes that are not all equal, ``cv >= sqrt(K) / (K - 1)`` (2/3 for K = 4; eps aside), so
    thresholds below that (the official 0, 0.4 and 0.5) scale the sum down without cutting it. The official code
    computes this in float32 after the scan; here in the scan output's dtype.

    Args:
        threshold: ``t``; 0 keeps every position with any variation.
        eps: added to the denominator (the official 1e-5).
    """

    def __init__(self, threshold: float = 0.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.threshold, self.eps = threshold, eps

    def forward(self, y: Tensor) -> Tensor:
        """(batch, K, channels, length) -> (batch, channels, length)."""
        shifted_mean = (y - y.min(dim=1, keepdim=True).values).mean(dim=1)
        variation = y.std(dim=1) / (shifted_mean + self.eps)
        return y.sum(dim=1) * F.relu(variation - self.threshold)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, eps={self.eps}"


class ScanHead(nn.Module):
    """One head: scan its subspace along one route pair (forwards and reversed), then fuse the K = 4 outputs.

    Args:
        dim: channels of the subspace.
        routes: ``(height, width) -> (2, height * width)`` source pixels of the head's two routes.
        d_state: SSM state size.
        dt_rank: rank of the dt projection, or "auto" for ceil(dim / 16).
        sra_threshold: threshold of the scan route attention.
        scan_backend: selective-scan backend.
    """

    def __init__(self, dim: int, routes: Callable[[int, int], Tensor], d_state: int = 16,
                 dt_rank: Union[int, str] = "auto", sra_threshold: float = 0.0, scan_backend: str = "auto") -> None:
        super().__init__()
        self.pattern = RouteTable(routes)
        self.ssm = RouteSSM(dim, self.pattern.num_routes, d_state, resolve_dt_rank(dt_rank, dim),
                            scan_backend=scan_backend)
        self.fusion = ScanRouteAttention(sra_threshold)

    def forward(self, x: Tensor) -> Tensor:
        """(batch, dim, height, width) -> (batch, dim, height * width), row-major."""
        return self.fusion(self.pattern.unscan(self.ssm(self.pattern.scan(x)), x.shape[2:]))


class MultiHeadScan(nn.Module):
    """The MHS module: subspace projection, one ``ScanHead`` per route letter, concatenation, LayerNorm, projection.

    Args:
        dim: input and output channels.
        routes: one letter of ``MHS_ROUTES`` per head ("CXS": the official 3 heads, "CXSZ": 4 heads).
        d_state: SSM state size of every head.
        dt_rank: dt rank of every head, or "auto" for ceil(head channels / 16).
        sra_threshold: threshold of the scan route attention.
        with_proj: LayerNorm and project the concatenated heads back to ``dim`` channels (the official
            default); without it the heads' channels must add up to ``dim``.
        scan_backend: selective-scan backend.
    """

    def __init__(self, dim: int, routes: str = "CXSZ", d_state: int = 16, dt_rank: Union[int, str] = "auto",
                 sra_threshold: float = 0.0, with_proj: bool = True, scan_backend: str = "auto") -> None:
        super().__init__()
        unknown = sorted(set(routes) - MHS_ROUTES.keys())
        if not routes or unknown or len(routes) > dim:
            raise ValueError(f"routes={routes!r}: expected 1 to {dim} letters of {''.join(MHS_ROUTES)} (one head each)"
                             + (f"; unknown {unknown}" if unknown else ""))
        self.head_dim = dim // len(routes)
        width = self.head_dim * len(routes)
        if not with_proj and width != dim:
            raise ValueError(f"with_proj=False needs {len(routes)} heads to split {dim} channels evenly")
        self.routes = routes
        self.subspace_proj = nn.Linear(dim, width, bias=False)
        self.heads = nn.ModuleList(ScanHead(self.head_dim, MHS_ROUTES[letter], d_state, dt_rank, sra_threshold,
                                            scan_backend) for letter in routes)
        self.norm = nn.LayerNorm(width) if with_proj else nn.Identity()
        self.proj = nn.Linear(width, dim, bias=False) if with_proj else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """(batch, dim, height, width) -> (batch, height, width, dim)."""
        batch, _, height, width = x.shape
        subspaces = torch.einsum("bchw,oc->bohw", x, self.subspace_proj.weight)
        step = self.head_dim
        y = torch.cat([head(subspaces[:, i * step:(i + 1) * step]) for i, head in enumerate(self.heads)], dim=1)
        return self.proj(self.norm(y.transpose(1, 2))).reshape(batch, height, width, -1)


class MultiHeadScanMixer(nn.Module):
    """MHS-VM's gated mixer (the official ``VSSGate``), a drop-in for ``SS2D`` on channels-last maps.

    in_proj -> (z split) -> depthwise conv -> act -> ``MultiHeadScan`` -> out_norm -> (times silu(z)) ->
    (out_proj when expanded). It takes SS2D's arguments, so ``VSSBlock(mixer_layer=...)`` and every model
    built from VSS blocks can use it; MHS-VM's settings are ``ssm_ratio=1``, ``gated=True``, ``d_state=16``.

    Args:
        d_model: input/output channels.
        d_state: SSM state size.
        ssm_ratio: inner width as a multiple of d_model (MHS-VM: 1, so there is no output projection).
        dt_rank: dt rank of every head, or "auto" for ceil(head channels / 16).
        d_conv: depthwise conv kernel size; below 2 disables the conv.
        conv_bias: whether the depthwise conv has a bias.
        gated: keep the multiplicative z branch.
        routes: one letter of ``MHS_ROUTES`` per head.
        sra_threshold: threshold of the scan route attention.
        with_proj: see ``MultiHeadScan``.
        act_layer: activation after the depthwise conv.
        norm_layer: normalisation of the scan output.
        dropout: dropout on the output.
        scan_backend: selective-scan backend.
    """

    def __init__(self, d_model: int, d_state: int = 16, ssm_ratio: float = 1.0, dt_rank: Union[int, str] = "auto",
                 d_conv: int = 3, conv_bias: bool = True, gated: bool = True, routes: str = "CXSZ",
                 sra_threshold: float = 0.0, with_proj: bool = True,
                 act_layer: Callable[[], nn.Module] = nn.SiLU,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, dropout: float = 0.0,
                 scan_backend: str = "auto") -> None:
        super().__init__()
        d_inner = int(ssm_ratio * d_model)
        self.gated = gated
        self.in_proj = nn.Linear(d_model, 2 * d_inner if gated else d_inner, bias=False)
        self.conv2d = (nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner,
                                 bias=conv_bias) if d_conv > 1 else nn.Identity())
        self.act = act_layer()
        self.mhs = MultiHeadScan(d_inner, routes, d_state, dt_rank, sra_threshold, with_proj, scan_backend)
        self.out_norm = norm_layer(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False) if d_inner != d_model else nn.Identity()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """(batch, height, width, d_model) -> same shape."""
        x = self.in_proj(x)
        if self.gated:
            x, z = x.chunk(2, dim=-1)
        y = self.out_norm(self.mhs(self.act(self.conv2d(x.permute(0, 3, 1, 2)))))
        if self.gated:
            y = y * F.silu(z)
        return self.dropout(self.out_proj(y))


# ---------------------------------------------------------------- the MHS-VM encoder as a timm model

# The official whole model (``models/vmunet/vmunet.py``: ``VMUNet`` holding ``VSSM`` as ``vmunet``) saves every
# key under ``vmunet.``; its encoder is ``patch_embed`` and ``layers``, its decoder ``layers_up``, ``final_up`` and
# ``final_conv``.
OFFICIAL_PREFIX = "vmunet."
OFFICIAL_ENCODER = ("patch_embed.", "layers.")

# Tensors the official state dict lists twice (alias -> primary): each ``ScanHead`` registers its ``MambaEngine`` as
# ``mambaeng`` and again inside its ``ScanPattern`` as ``scanning.seq2seq_engine``; ``MHSM`` assigns
# ``x_ssproj.weight`` to a second attribute, ``x_ssproj_W``. The route tables are plain tensor attributes of the
# official modules, so no file holds them; ours are computed from the map size (equal at 256x256).
OFFICIAL_ALIASES: KeyRules = [(r"\.scanning\.seq2seq_engine\.", ".mambaeng."), (r"\.x_ssproj_W$", ".x_ssproj.weight")]

# The official MHS module (``VSSGate.mhs``, an ``MHSM``) -> ``MultiHeadScan``. The official heads are named by
# letter and always built in the order C, X, S (, Z); ours are numbered in the order of ``routes`` ("CXS", "CXSZ").
MIXER_KEY_RULES: KeyRules = [
    (r"\.mhs\.x_ssproj\.weight$", ".mhs.subspace_proj.weight"),
    (r"\.mhs\.scanhead_([CXSZ])\.mambaeng\.", lambda m: f".mhs.heads.{'CXSZ'.index(m[1])}.ssm."),
    (r"\.mhs\.cat_norm\.", ".mhs.norm."),
    (r"\.mhs\.y_proj\.", ".mhs.proj."),
]
# The encoder: VM-UNet's skeleton is VMamba v0's (``patch_embed``, ``layers.i.blocks.j.ln_1`` / ``self_attention``,
# ``layers.i.downsample`` at the end of stage i), so VMamba's v1 table renames everything but the MHS module.
OFFICIAL_KEY_RULES: KeyRules = [*MIXER_KEY_RULES, *VMAMBA_KEY_RULES["v1"]]


def official_encoder(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The encoder part of an official MHS-VM state dict in this module's layout: the ``vmunet.`` prefix dropped,
    the duplicate keys checked equal and dropped (``OFFICIAL_ALIASES``), the rest renamed by ``OFFICIAL_KEY_RULES``."""
    body = {k[len(OFFICIAL_PREFIX):]: v for k, v in drop_aliases(state_dict, OFFICIAL_ALIASES).items()}
    return {rename_key(k, OFFICIAL_KEY_RULES): v for k, v in body.items() if k.startswith(OFFICIAL_ENCODER)}


def checkpoint_filter_fn(state_dict: Dict, model: nn.Module) -> Dict[str, Tensor]:
    """Weights in this module's layout (a checkpoint or state dict of it), unwrapped; or the encoder of an
    official MHS-VM checkpoint (``best_3h.pth``, ``best_4h.pth``, a ``latest.pth``), whose decoder is left out and
    which has no classifier: a classifier model keeps its own final norm and head.

    The whole segmentation model converts with ``tools.convert`` (``tools.convert_vmunet``).
    """
    state_dict = unwrap_state_dict(state_dict)
    if not any(key.startswith(OFFICIAL_PREFIX) for key in state_dict):
        return state_dict
    return with_own_weights(official_encoder(state_dict), model, ("norm.", "head."))


def _create_mhs_vmamba(variant: str, pretrained: bool = False, routes: str = "CXSZ", sra_threshold: float = 0.0,
                       with_proj: bool = True, **kwargs) -> HierarchicalMamba:
    """The hierarchical skeleton with VSS blocks whose mixer is ``MultiHeadScanMixer``; the other options than the
    skeleton's go to every block and its mixer (``d_state``, ``ssm_ratio``, ``gated``, ``mlp_ratio``, ...)."""
    mixer = partial(MultiHeadScanMixer, routes=routes, sra_threshold=sra_threshold, with_proj=with_proj)
    return build_backbone(HierarchicalMamba, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                          block_layer=VSSBlock, mixer_layer=mixer, **kwargs)


default_cfgs = generate_default_cfgs({
    "mhs_vmamba_tiny.untrained": imagenet_cfg(input_size=(3, 256, 256), pool_size=(8, 8), first_conv="stem.proj",
                                              license="apache-2.0", paper_ids="arXiv:2406.05992"),
    "test_mhs_vmamba.untrained": imagenet_cfg(input_size=(3, 32, 32), pool_size=(1, 1), first_conv="stem.proj",
                                              license="apache-2.0", paper_ids="arXiv:2406.05992"),
})

# VM-UNet's encoder (vanilla VMamba: patch-4 stem, patch merging, no MLP, d_state 16) with MHS mixers.
_MHS_VM = dict(d_state=16, ssm_ratio=1.0, gated=True, conv_bias=True, mlp_ratio=0.0, stem_layer=PatchStem,
               downsample_layer=PatchMerging)


@register_model
def mhs_vmamba_tiny(pretrained: bool = False, **kwargs) -> HierarchicalMamba:
    """MHS-VM's encoder: depths 2-2-2-2, dims 96-768, 4 heads "CXSZ" (``routes="CXS"`` for the 3-head model)."""
    args = dict(_MHS_VM, depths=(2, 2, 2, 2), dims=96, drop_path_rate=0.2)
    return _create_mhs_vmamba("mhs_vmamba_tiny", pretrained, **dict(args, **kwargs))


@register_model
def test_mhs_vmamba(pretrained: bool = False, **kwargs) -> HierarchicalMamba:
    """Smallest MHS encoder for tests (dims 12: 4 heads of 3 channels at the first stage)."""
    args = dict(_MHS_VM, depths=(1, 1, 1, 1), dims=12, drop_path_rate=0.0)
    return _create_mhs_vmamba("test_mhs_vmamba", pretrained, **dict(args, **kwargs))
