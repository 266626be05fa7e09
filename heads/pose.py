"""Top-down heatmap head for human pose estimation, as mmpose's ``HeatmapHead`` defines it.

One backbone level goes through ``n`` stride-2 transposed convolutions (4x4, no bias, BatchNorm, ReLU;
SimpleBaseline and ViTPose's classic decoder) and a 1x1 convolution to one heatmap per keypoint. ``n`` is
chosen so that the heatmaps come out at ``output_stride`` (4, a quarter of the input as in every official
top-down recipe): on HRVMamba's pose backbone, whose single output is already at stride 4, the head is
HRNet's final 1x1 convolution alone (``deconv_out_channels=None`` in the official configs); on a
hierarchical backbone's stride-32 level it is SimpleBaseline's three deconvolutions; on a plain backbone's
stride-16 level, ViTPose's two.

Module and parameter names match mmpose 1.x (``head.deconv_layers.0.weight``, ``head.deconv_layers.1.
running_mean``, ``head.final_layer.weight``) so that the head of an official pose checkpoint loads with
``strict=True``; ``POSE_HEAD_KEY_RULES`` also maps mmpose 0.x's ``keypoint_head.`` prefix.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence

from torch import Tensor, nn

from backbones._checkpoint import KeyRules, rename_key, unwrap_state_dict

from .interface import HeadInputs

# Official pose-checkpoint key -> the task's ``head.`` keys, applied in order with ``re.sub``. mmpose 1.x
# (HRVMamba's release: ``state_dict`` with ``backbone.*`` and ``head.*``) already uses our names; mmpose 0.x's
# TopdownHeatmapSimpleHead sat under ``keypoint_head.`` with the same inner names.
POSE_HEAD_KEY_RULES: KeyRules = [(r"^keypoint_head\.", "head.")]


def pose_head_state_dict(checkpoint: Dict) -> Dict[str, Tensor]:
    """The heatmap head's weights of an official (mmpose) pose checkpoint, in ``TopdownHeatmapHead``'s
    names (without the ``head.`` prefix); empty when the file has no head."""
    renamed = {rename_key(k, POSE_HEAD_KEY_RULES): v for k, v in unwrap_state_dict(checkpoint).items()}
    return {k[len("head."):]: v for k, v in renamed.items() if k.startswith("head.")}


class TopdownHeatmapHead(nn.Module):
    """Heatmaps ``(B, K, H / output_stride, W / output_stride)`` from one level of backbone features.

    Initialised as mmpose: normal(0, 0.001) convolution and deconvolution weights, zero biases, BatchNorm
    ones and zeros.

    Args:
        in_channels: channels of each backbone level (run.py passes ``feature_info.channels()``).
        num_classes: keypoints (one heatmap each; run.py passes the datamodule's keypoint count).
        strides: stride of each level (run.py passes ``feature_info.reduction()``); sets the number of
            deconvolutions. Without it, ``num_deconv`` must be given.
        in_index: the level the head reads (-1: the last, coarsest one).
        output_stride: stride of the heatmaps.
        num_deconv: number of deconvolutions (None: as many as take ``strides[in_index]`` to ``output_stride``).
        deconv_channels: width of every deconvolution (256 in SimpleBaseline and ViTPose).
        norm_layer: norm after each deconvolution.
    """

    inputs = HeadInputs.FEATURES

    def __init__(self, in_channels: Sequence[int], num_classes: int, strides: Optional[Sequence[int]] = None,
                 in_index: int = -1, output_stride: int = 4, num_deconv: Optional[int] = None,
                 deconv_channels: int = 256, norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        in_channels = list(in_channels)
        if not -len(in_channels) <= in_index < len(in_channels):
            raise ValueError(f"TopdownHeatmapHead: in_index={in_index} but the backbone has {len(in_channels)} levels")
        if num_deconv is None:
            if strides is None:
                raise ValueError("TopdownHeatmapHead: give the backbone's strides or num_deconv")
            ratio = strides[in_index] / output_stride
            num_deconv = round(math.log2(ratio)) if ratio >= 1 else -1
            if num_deconv < 0 or 2 ** num_deconv != ratio:
                raise ValueError(f"TopdownHeatmapHead: level {in_index} has stride {strides[in_index]}, which "
                                 f"stride-2 deconvolutions cannot bring to output_stride={output_stride}")
        self.in_index, self.output_stride = in_index, output_stride
        layers, width = [], in_channels[in_index]
        for _ in range(num_deconv):
            layers += [nn.ConvTranspose2d(width, deconv_channels, 4, stride=2, padding=1, bias=False),
                       norm_layer(deconv_channels), nn.ReLU(inplace=True)]
            width = deconv_channels
        self.deconv_layers = nn.Sequential(*layers) if layers else nn.Identity()
        self.final_layer = nn.Conv2d(width, num_classes, 1)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(module.weight, std=0.001)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        return self.final_layer(self.deconv_layers(features[self.in_index]))
