"""UperNet semantic-segmentation head with its FCN auxiliary head, as mmsegmentation defines them.

Structure and numbers follow mmseg 1.x (``decode_heads/uper_head.py``, ``fcn_head.py``, and the
``upernet_swin`` base config every vision-Mamba repository trains with): pyramid pooling (scales 1, 2, 3, 6)
on the last level, 1x1 laterals on the others, a top-down path with bilinear upsampling, 3x3 FPN convs,
all levels upsampled to the finest one, concatenated and fused by a 3x3 conv, then dropout and a 1x1
classifier. Module and parameter names match mmseg's (``decode_head.psp_modules.0.1.conv.weight``,
``auxiliary_head.convs.0.bn.weight``, ...), so the head part of an official UperNet checkpoint loads
with ``strict=True``.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .interface import HeadInputs


class ConvModule(nn.Module):
    """Conv (no bias), norm, ReLU: mmcv's ``ConvModule`` with a norm layer, named ``conv`` and ``bn`` as there
    (timm's ``ConvNormAct``, used by HRVMamba's neck, has the same keys but not mmcv's initialisation).

    Initialised as mmcv does: Kaiming normal (fan-out, ReLU) for the conv, ones and zeros for the norm.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = norm_layer(out_channels)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.activate(self.bn(self.conv(x)))


def resize(x: Tensor, size: Sequence[int], align_corners: bool = False) -> Tensor:
    """Bilinear resize to ``size`` (a no-op when the size already matches)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


class PyramidPooling(nn.ModuleList):
    """PSPNet's pyramid pooling module: for each scale, adaptive average pooling to ``scale x scale``, a 1x1
    ConvModule, and bilinear upsampling back; returns the input and every pooled branch."""

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int,
                 norm_layer: Callable[[int], nn.Module], align_corners: bool = False) -> None:
        super().__init__(nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvModule(in_channels, channels, 1, norm_layer))
                         for scale in pool_scales)
        self.align_corners = align_corners

    def forward(self, x: Tensor) -> list[Tensor]:
        return [x] + [resize(branch(x), x.shape[-2:], self.align_corners) for branch in self]


class DecodeHead(nn.Module):
    """What mmseg's decode heads share: dropout then a 1x1 classifier (``conv_seg``, normal(0, 0.01) init)."""

    def __init__(self, channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def cls_seg(self, x: Tensor) -> Tensor:
        return self.conv_seg(self.dropout(x))


class UPerHead(DecodeHead):
    """UperNet's decoder (Unified Perceptual Parsing): PPM on the last level plus an FPN over all levels.

    Args:
        in_channels: channels of each backbone level, finest first.
        num_classes: output classes.
        channels: width of every decoder conv (512 in mmseg's UperNet).
        pool_scales: pyramid-pooling output sizes.
        dropout: dropout before the classifier.
        norm_layer: norm after each conv (BatchNorm; Lightning's ``sync_batchnorm`` makes it SyncBN under DDP).
        align_corners: ``align_corners`` of every bilinear resize.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d, align_corners: bool = False) -> None:
        super().__init__(channels, num_classes, dropout)
        self.align_corners = align_corners
        self.psp_modules = PyramidPooling(pool_scales, in_channels[-1], channels, norm_layer, align_corners)
        self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3, norm_layer)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1, norm_layer) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, norm_layer) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, norm_layer)

    def forward_features(self, features: Sequence[Tensor]) -> Tensor:
        """The fused decoder features (before the classifier) at the finest level's resolution."""
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, features)]
        laterals.append(self.bottleneck(torch.cat(self.psp_modules(features[-1]), dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:], self.align_corners)
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        return self.fpn_bottleneck(torch.cat([resize(x, size, self.align_corners) for x in outs], dim=1))

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        return self.cls_seg(self.forward_features(features))


class FCNHead(DecodeHead):
    """FCN auxiliary head on one backbone level: ``num_convs`` 3x3 ConvModule layers, then the classifier.

    Args:
        in_channels: channels of the level it reads.
        num_classes: output classes.
        channels: conv width (256 for UperNet's auxiliary head).
        num_convs: number of 3x3 convs.
        dropout: dropout before the classifier.
        norm_layer: norm after each conv.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, num_convs: int = 1,
                 dropout: float = 0.1, norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__(channels, num_classes, dropout)
        widths = [in_channels] + [channels] * num_convs
        self.convs = nn.Sequential(*(ConvModule(c_in, c_out, 3, norm_layer)
                                     for c_in, c_out in zip(widths[:-1], widths[1:])))

    def forward(self, x: Tensor) -> Tensor:
        return self.cls_seg(self.convs(x))


class UperNet(nn.Module):
    """UperNet on multi-scale backbone features, with mmseg's FCN auxiliary head for training.

    ``forward`` returns logits at the finest feature level's resolution (stride 4 for every backbone here);
    the task resizes them to the label size. ``forward_aux`` gives the auxiliary logits, whose loss is
    weighted by ``aux_weight`` (0.4 in mmseg); the auxiliary head is not used at inference.

    Args:
        in_channels: channels of each backbone level (run.py passes ``feature_info.channels()``).
        num_classes: output classes.
        strides: each level's stride (run.py passes ``feature_info.reduction()``); must be increasing.
        channels: decoder width.
        pool_scales: pyramid-pooling scales.
        dropout: dropout before both classifiers.
        aux_index: backbone level the auxiliary head reads (2 = the third, stride-16 level), or None for none.
        aux_channels: auxiliary conv width.
        aux_num_convs: auxiliary 3x3 convs.
        aux_weight: weight of the auxiliary loss.
        norm_layer: norm after each conv.
        align_corners: ``align_corners`` of every bilinear resize.
    """

    inputs = HeadInputs.FEATURES

    def __init__(self, in_channels: Sequence[int], num_classes: int, strides: Optional[Sequence[int]] = None,
                 channels: int = 512, pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1,
                 aux_index: Optional[int] = 2, aux_channels: int = 256, aux_num_convs: int = 1,
                 aux_weight: float = 0.4, norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
                 align_corners: bool = False) -> None:
        super().__init__()
        in_channels = list(in_channels)
        if strides is not None and list(strides) != sorted(strides):
            raise ValueError(f"UperNet: feature levels must be ordered finest first, got strides {list(strides)}")
        if aux_index is not None and not -len(in_channels) <= aux_index < len(in_channels):
            raise ValueError(f"UperNet: aux_index={aux_index} but the backbone has {len(in_channels)} levels")
        self.strides = list(strides) if strides is not None else None
        self.aux_index, self.aux_weight = aux_index, aux_weight
        self.decode_head = UPerHead(in_channels, num_classes, channels, pool_scales, dropout, norm_layer,
                                    align_corners)
        self.auxiliary_head = None
        if aux_index is not None:
            self.auxiliary_head = FCNHead(in_channels[aux_index], num_classes, aux_channels, aux_num_convs,
                                          dropout, norm_layer)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        return self.decode_head(features)

    def forward_aux(self, features: Sequence[Tensor]) -> Optional[Tensor]:
        """Auxiliary logits at the resolution of level ``aux_index``, or None without an auxiliary head."""
        if self.auxiliary_head is None:
            return None
        return self.auxiliary_head(features[self.aux_index])


# The keys of mmseg's EncoderDecoder (0.x and 1.x name them alike) that are UperNet's: this module keeps mmseg's
# module names, so its key table is the identity on these prefixes (the backbone's keys follow the family's rules).
MMSEG_PREFIXES = ("decode_head.", "auxiliary_head.")


def from_mmseg(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The UperNet part of an mmseg segmentor's state dict (``decode_head.*``, ``auxiliary_head.*``)."""
    return {k: v for k, v in state_dict.items() if k.startswith(MMSEG_PREFIXES)}
