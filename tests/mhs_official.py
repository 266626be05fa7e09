"""A stand-in of the official MHS-VM model (PixDeep/MHS-VM, ``models/vmunet/{mhsm,vmamba,vmunet}.py``) for tests.

Written here from the official module tree, not from our classes: the same module names, nesting, parameter
names and shapes, so ``state_dict()`` lists exactly what the official ``train.py`` saves -- including the tensors
it lists twice (each ``ScanHead``'s ``MambaEngine`` as ``mambaeng`` and as ``scanning.seq2seq_engine``,
``MHSM.x_ssproj.weight`` also as ``x_ssproj_W``) and no route tables (the official modules keep them as plain
tensor attributes). ``forward`` computes the official model in the input's dtype, with the float64 selective
scan of ``tests.oracle``: gather each route and its reverse, scan the four sequences with their own parameters,
bring them back with the inverse routes, fuse them with the GFU, and in the skeleton add each encoder layer's
*input* to the decoder before upsampling (``VSSM.forward_features_up``). The route tables are the official ones
(our route functions, whose 256x256 tables equal the released ``route_dict_4l.pth``: tests/test_mhs.py).
With ``mixer=SS2D`` it is the plain VM-UNet (JCruan519/VM-UNet, same skeleton and wrapper) with VMamba v0's SS2D:
row-major and column-major scans, each forwards and reversed, summed.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backbones.mhs import MHS_ROUTES
from tests.oracle import oracle_selective_scan

ROUTE_LETTERS = "CXSZ"


def official_route_table(height: int, width: int) -> Tensor:
    """``(8, 2, L)`` as in ``route_dict_4l.pth``: rows C0 C1 X0 X1 S0 S1 Z0 Z1, each (source pixels, inverse)."""
    rows = []
    for letter in ROUTE_LETTERS:
        for route in MHS_ROUTES[letter](height, width):
            rows.append(torch.stack((route, route.argsort())))
    return torch.stack(rows)


class MambaEngine(nn.Module):
    """K = 4 stacked selective-scan parameter sets on ``d_model`` channels (no expansion)."""

    def __init__(self, d_model: int, d_state: int = 16, dt_rank: Optional[int] = None) -> None:
        super().__init__()
        self.d_state, self.dt_rank = d_state, dt_rank or math.ceil(d_model / 16)
        self.x_proj_weight = nn.Parameter(torch.zeros(4, self.dt_rank + 2 * d_state, d_model))
        self.dt_projs_weight = nn.Parameter(torch.zeros(4, d_model, self.dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.zeros(4, d_model))
        self.A_logs = nn.Parameter(torch.zeros(4 * d_model, d_state))
        self.Ds = nn.Parameter(torch.zeros(4 * d_model))

    def forward(self, xs: Tensor) -> Tensor:
        """(b, k, d, l) -> (b, k, d, l)."""
        b, k, d, length = xs.shape
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        dts, bs, cs = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        ys = oracle_selective_scan(xs.reshape(b, k * d, length), dts.reshape(b, k * d, length),
                                   -torch.exp(self.A_logs), bs, cs, self.Ds, delta_bias=self.dt_projs_bias.reshape(-1),
                                   delta_softplus=True)
        return ys.view(b, k, d, length).to(xs.dtype)


class ScanPattern(nn.Module):
    """The pattern's two routes, forwards and reversed, through the (shared) engine and back to row-major order."""

    def __init__(self, pattern: str, s2s_engine: MambaEngine) -> None:
        super().__init__()
        self.scan_pattern = pattern
        self.seq2seq_engine = s2s_engine

    def forward(self, x: Tensor) -> Tensor:
        b, d, h, w = x.shape
        table = official_route_table(h, w)[2 * ROUTE_LETTERS.index(self.scan_pattern):][:2]
        flat = x.reshape(b, d, h * w)
        seqs = [flat.index_select(-1, table[0, 0]), flat.index_select(-1, table[1, 0])]
        ys = self.seq2seq_engine(torch.stack([seqs[0], seqs[0].flip(-1), seqs[1], seqs[1].flip(-1)], dim=1))
        back = [ys[:, 0].index_select(-1, table[0, 1]), ys[:, 1].flip(-1).index_select(-1, table[0, 1]),
                ys[:, 2].index_select(-1, table[1, 1]), ys[:, 3].flip(-1).index_select(-1, table[1, 1])]
        return torch.stack(back, dim=1)


class GFU(nn.Module):
    """y = sum_k y_k * ReLU(std_k(y) / (mean_k(y - min_k y) + 1e-5) - t)."""

    def __init__(self, t: float = 0.0) -> None:
        super().__init__()
        self.t = t

    def forward(self, x: Tensor) -> Tensor:
        cv = x.std(dim=1) / ((x - x.min(dim=1, keepdim=True).values).mean(dim=1) + 1e-5)
        return x.sum(dim=1) * F.relu(cv - self.t)


class ScanHead(nn.Module):
    def __init__(self, dim_sub: int, d_state: int, gfu_t: float, pattern: str) -> None:
        super().__init__()
        self.esfusion = GFU(gfu_t)
        self.mambaeng = MambaEngine(dim_sub, d_state)
        self.scanning = ScanPattern(pattern, self.mambaeng)  # the same engine, registered a second time

    def forward(self, x: Tensor) -> Tensor:
        return self.esfusion(self.scanning(x))


class MHSM(nn.Module):
    def __init__(self, d_model: int, d_state: int, head_num: int, gfu_t: float) -> None:
        super().__init__()
        self.head_num, self.dim_sub = head_num, d_model // head_num
        self.x_ssproj = nn.Linear(d_model, self.dim_sub * head_num, bias=False)
        self.x_ssproj_W = self.x_ssproj.weight  # the same parameter under a second name
        for letter in ROUTE_LETTERS[:head_num]:
            setattr(self, f"scanhead_{letter}", ScanHead(self.dim_sub, d_state, gfu_t, letter))
        self.cat_norm = nn.LayerNorm(head_num * self.dim_sub)
        self.y_proj = nn.Linear(head_num * self.dim_sub, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """(b, d, h, w) -> (b, h, w, d)."""
        b, _, h, w = x.shape
        parts = torch.einsum("bdhw,cd->bchw", x, self.x_ssproj_W).split(self.dim_sub, dim=1)
        y = torch.cat([getattr(self, f"scanhead_{letter}")(part) for letter, part in zip(ROUTE_LETTERS, parts)], 1)
        return self.y_proj(self.cat_norm(y.transpose(-1, -2))).view(b, h, w, -1)


class VSSGate(nn.Module):
    def __init__(self, d_model: int, d_state: int, head_num: int, gfu_t: float) -> None:
        super().__init__()
        self.in_proj = nn.Linear(d_model, 2 * d_model, bias=False)
        self.conv2d = nn.Conv2d(d_model, d_model, 3, padding=1, groups=d_model, bias=True)
        self.mhs = MHSM(d_model, d_state, head_num, gfu_t)
        self.out_norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        x, z = self.in_proj(x).chunk(2, dim=-1)
        y = self.mhs(F.silu(self.conv2d(x.permute(0, 3, 1, 2))))
        return self.out_norm(y) * F.silu(z)


class SS2D(MambaEngine):
    """VMamba v0's SS2D (VM-UNet's mixer): expansion 2, dt rank from the block width, ``forward_corev0``."""

    def __init__(self, d_model: int, d_state: int = 16) -> None:
        d_inner = 2 * d_model
        super().__init__(d_inner, d_state, dt_rank=math.ceil(d_model / 16))
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, 3, padding=1, groups=d_inner, bias=True)
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, _ = x.shape
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = F.silu(self.conv2d(x.permute(0, 3, 1, 2)))
        rows, cols = x.reshape(b, -1, h * w), x.transpose(2, 3).reshape(b, -1, h * w)
        ys = super().forward(torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1))
        back_cols = [y.reshape(b, -1, w, h).transpose(2, 3).reshape(b, -1, h * w)
                     for y in (ys[:, 1], ys[:, 3].flip(-1))]
        y = ys[:, 0] + ys[:, 2].flip(-1) + back_cols[0] + back_cols[1]
        return self.out_proj(self.out_norm(y.transpose(1, 2).reshape(b, h, w, -1)) * F.silu(z))


class VSSBlock(nn.Module):
    def __init__(self, hidden_dim: int, mixer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden_dim)
        self.self_attention = mixer(hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.self_attention(self.ln_1(x))


class PatchMerging2D(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class PatchExpand(nn.Module):
    """``PatchExpand2D`` (``dim`` -> ``2 dim`` in, x2) and ``Final_PatchExpand2D`` (x4) of the official skeleton."""

    def __init__(self, dim: int, in_dim: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.expand = nn.Linear(in_dim, scale * in_dim, bias=False)
        self.norm = nn.LayerNorm(in_dim // scale)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        x = self.expand(x).view(b, h, w, self.scale, self.scale, c // self.scale)
        return self.norm(x.permute(0, 1, 3, 2, 4, 5).reshape(b, h * self.scale, w * self.scale, c // self.scale))


class VSSLayer(nn.Module):
    def __init__(self, dim: int, depth: int, downsample: bool, mixer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(VSSBlock(dim, mixer) for _ in range(depth))
        self.downsample = PatchMerging2D(dim) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class VSSLayerUp(nn.Module):
    def __init__(self, dim: int, depth: int, upsample: bool, mixer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(VSSBlock(dim, mixer) for _ in range(depth))
        self.upsample = PatchExpand(dim, 2 * dim, 2) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        x = x if self.upsample is None else self.upsample(x)
        for block in self.blocks:
            x = block(x)
        return x


class PatchEmbed2D(nn.Module):
    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, 4, stride=4)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class VSSM(nn.Module):
    """The official skeleton: encoder ``layers`` (downsample at the end), decoder ``layers_up`` (upsample first)."""

    def __init__(self, dims: int, depths, depths_decoder, num_classes: int, mixer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        dims = [dims * 2 ** i for i in range(len(depths))]
        self.patch_embed = PatchEmbed2D(3, dims[0])
        self.layers = nn.ModuleList(VSSLayer(dim, depth, i < len(depths) - 1, mixer)
                                    for i, (dim, depth) in enumerate(zip(dims, depths)))
        self.layers_up = nn.ModuleList(VSSLayerUp(dim, depth, i > 0, mixer)
                                       for i, (dim, depth) in enumerate(zip(dims[::-1], depths_decoder)))
        self.final_up = PatchExpand(dims[0], dims[0], 4)
        self.final_conv = nn.Conv2d(dims[0] // 4, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        skips = []
        for layer in self.layers:
            skips.append(x)
            x = layer(x)
        for index, layer_up in enumerate(self.layers_up):
            x = layer_up(x if index == 0 else x + skips[-index])
        return self.final_conv(self.final_up(x).permute(0, 3, 1, 2))


class VMUNet(nn.Module):
    """The wrapper whose ``state_dict()`` train.py saves; ``forward`` gives the logits (the official one applies a
    sigmoid for one class, which our task applies in its loss and metrics). ``mixer``: ``dim -> module``, MHS-VM's
    gated multi-head scan by default, ``SS2D`` for the plain VM-UNet."""

    def __init__(self, dims: int = 96, depths=(2, 2, 2, 2), depths_decoder=(2, 2, 2, 1), num_classes: int = 1,
                 head_num: int = 4, gfu_t: float = 0.5, mixer: Optional[Callable[[int], nn.Module]] = None) -> None:
        super().__init__()
        mixer = mixer or partial(VSSGate, d_state=16, head_num=head_num, gfu_t=gfu_t)
        self.vmunet = VSSM(dims, depths, depths_decoder, num_classes, mixer)

    def forward(self, x: Tensor) -> Tensor:
        return self.vmunet(x)


@torch.no_grad()
def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking random weights: norms near 1, dt biases of small steps, A_logs near S4D-real, Ds near 1."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
        if name.endswith("A_logs"):
            p.copy_(torch.log(torch.arange(1, p.shape[1] + 1, dtype=p.dtype)) + 0.1 * noise)
        elif name.endswith("dt_projs_bias"):
            p.copy_(-3.0 + 0.5 * noise)
        elif name.endswith("Ds") or (p.dim() == 1 and "norm" in name and name.endswith("weight")):
            p.copy_(1.0 + 0.1 * noise)
        elif p.dim() == 1:
            p.copy_(0.1 * noise)
        else:
            p.copy_(noise / math.sqrt(p[0].numel()))
    return model
