"""MSVM-UNet decoder (Chen et al., arXiv 2408.13735): LKPE upsampling, concatenated skips, multi-scale VSS blocks.

Facts from the official code (gndlwch2w/msvm-unet, ``model/decoder.py``): three up blocks, deepest first,
each = LKPE (1x1 conv C -> 2C with bias, BatchNorm, ReLU, 3x3 depthwise conv, 2x2 pixel shuffle to C/2,
LayerNorm) -> concatenation with the encoder map of that level -> 1x1 linear 2C -> C -> two MSVSS blocks.
An MSVSS block is VMamba v2's VSS block (d_state 1, expansion 1, no z gate, conv without bias) whose MLP
(ratio 4) has a multi-scale depthwise convolution between its two linear layers: ``x + sum_k dwconv_k(x)``
for k = 1, 3, 5, no bias. Drop path falls linearly from 0.2 to 0 over the six decoder blocks. The final
FLKPE is the same expansion with 16C channels and a 4x4 shuffle back to C, LayerNorm, and a 1x1 conv to
the classes. With the VMamba-T[s1l8] encoder (``vmamba_tiny_s1l8``, the official ``vssm1_tiny_0230s``)
the model has 35.93 M parameters (29.48 M encoder + 6.45 M decoder). The decoder keeps PyTorch's default
initialisation, as the reference does.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from backbones.layers import VSSBlock

from .interface import HeadInputs
from .vmunet import pixel_expand

__all__ = ["LKPE", "MSVMUNetDecoder", "MultiScaleConv", "MultiScaleMlp", "MSVSSBlock"]


class MultiScaleConv(nn.Module):
    """``x + sum_k dwconv_k(x)`` over depthwise convs of the given kernel sizes (NCHW, no bias)."""

    def __init__(self, dim: int, kernel_sizes: Sequence[int] = (1, 3, 5)) -> None:
        super().__init__()
        self.dw_convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim, bias=False)
                                      for k in kernel_sizes)

    def forward(self, x: Tensor) -> Tensor:
        return x + sum(conv(x) for conv in self.dw_convs)


class MultiScaleMlp(nn.Module):
    """Channels-last MLP with a multi-scale depthwise convolution after the activation (MS-MLP)."""

    def __init__(self, dim: int, hidden: int, kernel_sizes: Sequence[int] = (1, 3, 5),
                 act_layer: Callable[[], nn.Module] = nn.GELU, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.multiscale_conv = MultiScaleConv(hidden, kernel_sizes)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(self.act(self.fc1(x)))
        x = self.multiscale_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.drop(self.fc2(x))


class MSVSSBlock(VSSBlock):
    """A VSS block whose MLP is ``MultiScaleMlp`` (MSVM-UNet's MSVSS block); channels-last.

    Args:
        dim: channels.
        drop_path: stochastic depth of both residual branches.
        mlp_ratio: MLP hidden width as a multiple of dim.
        kernel_sizes: depthwise kernels of the multi-scale convolution.
        norm_layer: channels-last normalisation.
        **ssm_kwargs: passed to ``VSSBlock``: its ``mixer_layer`` (``SS2D`` by default) and the mixer's options.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, mlp_ratio: float = 4.0,
                 kernel_sizes: Sequence[int] = (1, 3, 5), norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
                 **ssm_kwargs) -> None:
        super().__init__(dim, drop_path, mlp_ratio=0.0, norm_layer=norm_layer, **ssm_kwargs)
        self.norm2 = norm_layer(dim)
        self.mlp = MultiScaleMlp(dim, int(dim * mlp_ratio), kernel_sizes)


# VMamba v2 settings of the reference's decoder blocks.
v2_msvss_block = partial(MSVSSBlock, mlp_ratio=4.0, d_state=1, ssm_ratio=1.0, gated=False, conv_bias=False)


class LKPE(nn.Module):
    """Large-kernel patch expanding, NCHW in, channels-last out: 1x1 conv to ``scale^2 * out`` channels,
    BatchNorm, ReLU, 3x3 depthwise conv, pixel expand by ``scale``, LayerNorm."""

    def __init__(self, in_dim: int, out_dim: int, scale: int = 2) -> None:
        super().__init__()
        hidden = scale * scale * out_dim
        self.scale = scale
        self.expand = nn.Sequential(nn.Conv2d(in_dim, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
                                    nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden))
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(pixel_expand(self.expand(x).permute(0, 2, 3, 1), self.scale))


class UpBlock(nn.Module):
    """LKPE from the level below, concatenation with the skip, linear fusion, MSVSS blocks (NCHW in and out)."""

    def __init__(self, in_dim: int, out_dim: int, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.up = LKPE(in_dim, out_dim)
        self.concat_layer = nn.Linear(2 * out_dim, out_dim)
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = torch.cat((self.up(x), skip.permute(0, 2, 3, 1)), dim=-1)
        return self.blocks(self.concat_layer(x)).permute(0, 3, 1, 2)


class MSVMUNetDecoder(nn.Module):
    """MSVM-UNet's decoder on any backbone's multi-scale features.

    Args:
        in_channels: channels of the backbone's feature maps, finest first (from run.py).
        strides: their strides; the finest sets the final expansion (4 for every backbone here).
        num_classes: output channels.
        depths: MSVSS blocks per up block, deepest first (the reference: 2, 2, 2).
        drop_path_rate: stochastic depth, falling linearly to 0 over all decoder blocks.
        block: ``(dim, drop_path=...) -> channels-last module``; VMamba v2 MSVSS blocks by default.
    """

    inputs = HeadInputs.FEATURES

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], num_classes: int,
                 depths: Sequence[int] = (2, 2, 2), drop_path_rate: float = 0.2,
                 block: Callable[..., nn.Module] = v2_msvss_block) -> None:
        super().__init__()
        if len(depths) != len(in_channels) - 1:
            raise ValueError(f"MSVMUNetDecoder: {len(depths)} up-block depths for {len(in_channels)} feature "
                             f"levels (one per level above the deepest)")
        dims = list(in_channels)[::-1]
        rates = torch.linspace(drop_path_rate, 0, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for level, depth in enumerate(depths):
            start = sum(depths[:level])
            blocks = [block(dims[level + 1], drop_path=rates[start + j]) for j in range(depth)]
            self.layers.append(UpBlock(dims[level], dims[level + 1], blocks))
        self.final_expand = LKPE(in_channels[0], in_channels[0], scale=strides[0])
        self.final_conv = nn.Conv2d(in_channels[0], num_classes, 1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """NCHW feature maps, finest first -> logits at ``strides[0]`` times the finest resolution."""
        features = list(features)[::-1]
        x = features[0]
        for layer, skip in zip(self.layers, features[1:]):
            x = layer(x, skip)
        return self.final_conv(self.final_expand(x).permute(0, 3, 1, 2))
