"""Mask R-CNN with FPN on any backbone's multi-scale features, from torchvision's detection components.

Everything after the backbone: the image transform (resize, normalise, pad to 32), an FPN (256 channels, 5 levels:
the 4 backbone levels plus a stride-2 max-pooled level, as mmdet's ``FPN(num_outs=5)``), the RPN and the RoI heads.
Settings follow mmdet's ``mask-rcnn_r50_fpn`` base that the vision-Mamba repositories train with: anchors 32-512
(one size per level) x ratios 0.5/1/2; RPN 256 samples (half positive, IoU 0.7/0.3), 2000 proposals per level
before NMS 0.7 and 1000 after in training, 1000/1000 at test; RoI heads 512 samples (a quarter positive, IoU 0.5),
box-coder weights 1/1/1/1 (RPN) and 10/10/5/5 (RoI, mmdet's target stds 0.1/0.2), RoIAlign 7 (boxes) and 14
(masks) with adaptive sampling, two 1024-wide FC layers, four 256-channel 3x3 mask convs, 28x28 masks; test score
threshold 0.05, NMS 0.5, 100 detections, mask threshold 0.5 (applied by the task).

Where torchvision's components differ from mmdet's and a subclass can follow mmdet, they do: RoIAlign with
``aligned=True`` (mmcv's ``RoIAlign(aligned=True)``; torchvision's pooler hard-codes ``aligned=False``), anchors
at each level's nominal stride without rounding (torchvision rounds half-sizes and infers strides as
image size // feature size), box deltas clamped on both sides when decoded, mmdet's rounded resize size and
its mask pasting. The remaining differences (losses, samplers, low-quality matches) are listed with their
measured effect in docs/mm/README.md. ``from_mmdet`` maps an mmdet checkpoint's neck and head weights onto this module.
Runs on CPU with torchvision's own ops.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.poolers import _convert_to_roi_format, _setup_scales

from backbones._checkpoint import KeyRules, rename_key

from .interface import HeadInputs

Targets = Optional[list[dict[str, Tensor]]]


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's multi-scale RoIAlign (same level mapping) with ``aligned=True``: sampling points shifted by
    half a pixel so that a box covers the feature cells under it, as mmcv's ``RoIAlign(aligned=True)`` in mmdet's
    ``SingleRoIExtractor``."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = [x[name] for name in self.featmap_names]
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(features, image_shapes, self.canonical_scale,
                                                          self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        levels = self.map_levels(boxes)
        result = features[0].new_zeros((len(rois), features[0].shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            index = torch.where(levels == level)[0]
            result[index] = roi_align(feature, rois[index], self.output_size, spatial_scale=scale,
                                      sampling_ratio=self.sampling_ratio, aligned=True).to(result.dtype)
        return result


class MMDetAnchorGenerator(AnchorGenerator):
    """torchvision's anchor generator with mmdet's anchors: base anchors not rounded to whole pixels, and each
    level's nominal stride (torchvision derives it as image size // feature size: 61 instead of 64 for the pooled
    level of an 800-pixel side).

    Args:
        sizes: anchor sizes per level.
        aspect_ratios: height / width ratios per level.
        strides: stride of each level.
    """

    def __init__(self, sizes: Sequence[Sequence[int]], aspect_ratios: Sequence[Sequence[float]],
                 strides: Sequence[int]) -> None:
        super().__init__(tuple(tuple(s) for s in sizes), tuple(tuple(r) for r in aspect_ratios))
        self.strides = list(strides)

    def generate_anchors(self, scales: Sequence[int], aspect_ratios: Sequence[float],
                         dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None) -> Tensor:
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        h_ratios = torch.sqrt(torch.as_tensor(aspect_ratios, dtype=dtype, device=device))
        ws = (scales[None, :] / h_ratios[:, None]).reshape(-1)
        hs = (scales[None, :] * h_ratios[:, None]).reshape(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        grid_sizes = [feature_map.shape[-2:] for feature_map in feature_maps]
        device = feature_maps[0].device
        strides = [[torch.tensor(s, dtype=torch.int64, device=device)] * 2 for s in self.strides]
        self.set_cell_anchors(feature_maps[0].dtype, device)
        anchors = torch.cat(self.grid_anchors(grid_sizes, strides))
        return [anchors for _ in image_list.image_sizes]


class MMDetBoxCoder(BoxCoder):
    """torchvision's box coder decoding as mmdet's ``DeltaXYWHBBoxCoder``: the log width / height change is clamped
    to +-log(1000 / 16) on both sides (torchvision clamps only growth, so a strongly negative delta gives a box of
    almost no height where mmdet keeps 1.6 % of the anchor's)."""

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        codes = rel_codes.clone()
        codes[:, 2::4].clamp_(min=-self.bbox_xform_clip * self.weights[2])
        codes[:, 3::4].clamp_(min=-self.bbox_xform_clip * self.weights[3])
        return super().decode_single(codes, boxes)


def paste_masks(masks: Tensor, boxes: Tensor, size: Sequence[int]) -> Tensor:
    """``(N, 1, M, M)`` mask probabilities pasted into ``(N, 1, H, W)`` images as mmdet's ``FCNMaskHead`` pastes
    them: each output pixel centre is mapped into its box's mask and sampled bilinearly (outside the mask: 0).
    torchvision instead resizes the mask to the box rounded to whole pixels, which moves mask edges by up to a
    pixel (mean IoU 0.9575 between the two on 20-300 pixel boxes, docs/mm/README.md)."""
    height, width = size
    out = masks.new_zeros((len(masks), 1, height, width))
    for index, (mask, (x0, y0, x1, y1)) in enumerate(zip(masks, boxes.tolist())):
        # Bilinear sampling reaches half a mask cell beyond the box; further out the result is exactly 0.
        margin_x, margin_y = abs(x1 - x0) / mask.shape[-1] / 2 + 1, abs(y1 - y0) / mask.shape[-2] / 2 + 1
        left, top = max(math.floor(min(x0, x1) - margin_x), 0), max(math.floor(min(y0, y1) - margin_y), 0)
        right = min(math.ceil(max(x0, x1) + margin_x), width)
        bottom = min(math.ceil(max(y0, y1) + margin_y), height)
        if right <= left or bottom <= top:
            continue
        xs = (torch.arange(left, right, dtype=masks.dtype) + 0.5 - x0) / max(x1 - x0, 1e-6) * 2 - 1
        ys = (torch.arange(top, bottom, dtype=masks.dtype) + 0.5 - y0) / max(y1 - y0, 1e-6) * 2 - 1
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]
        out[index, :, top:bottom, left:right] = F.grid_sample(mask[None], grid, align_corners=False)[0]
    return out


class MMDetTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform with mmdet's ``Resize(keep_ratio=True)`` output size, each side rounded
    (mmcv's ``rescale_size``: ``int(side * scale + 0.5)``) where torchvision floors it, and mmdet's mask pasting
    (``paste_masks``) when detections are mapped back to the original images."""

    def postprocess(self, result: list[dict[str, Tensor]], image_shapes: list[tuple[int, int]],
                    original_image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        if self.training:
            return result
        for prediction, size, original in zip(result, image_shapes, original_image_sizes):
            prediction["boxes"] = resize_boxes(prediction["boxes"], size, original)
            if "masks" in prediction:
                prediction["masks"] = paste_masks(prediction["masks"], prediction["boxes"], original)
        return result

    def resize(self, image: Tensor, target: Optional[dict[str, Tensor]] = None
               ) -> tuple[Tensor, Optional[dict[str, Tensor]]]:
        if self.training and self._skip_resize:
            return image, target
        height, width = image.shape[-2:]
        short = float(self.torch_choice(self.min_size) if self.training else self.min_size[-1])
        scale = min(short / min(height, width), self.max_size / max(height, width))
        self.fixed_size = (int(width * scale + 0.5), int(height * scale + 0.5))
        try:
            return super().resize(image, target)
        finally:
            self.fixed_size = None


class MaskRCNN(nn.Module):
    """Mask R-CNN (or Faster R-CNN with ``with_masks=False``) head on backbone features.

    The task runs ``images, targets = head.transform(images, targets)``, the backbone on
    ``images.tensors``, then ``head(features, images, targets)``, and maps detections back to the original
    image sizes with ``head.transform.postprocess``.

    Args:
        in_channels: channels of each backbone level (run.py passes ``feature_info.channels()``).
        num_classes: object classes, without background (labels in targets are 1..num_classes).
        strides: stride of each backbone level (run.py passes ``feature_info.reduction()``): the anchors' strides
            (the pooled level's doubled; 4-64 when not given). RoIAlign scales are inferred from the feature sizes.
        fpn_channels: FPN width.
        representation_size: width of the two box-head FC layers.
        mask_channels: width of the four mask-head convs.
        min_size: shorter image side after resizing; a sequence picks one at random per training image
            (multi-scale training), the last one is used at test.
        max_size: cap on the longer side.
        with_masks: add the mask branch (Mask R-CNN) or not (Faster R-CNN, for box-only data).
        anchor_sizes: one anchor size per FPN level.
        rpn_post_nms_top_n_train: proposals kept per image in training (mmdet 1000, torchvision 2000).
        box_score_thresh: test-time score threshold.
        box_detections_per_img: detections kept per image at test.
        image_mean: normalisation mean (0-1 scale) applied by the transform.
        image_std: normalisation std (0-1 scale).
    """

    inputs = HeadInputs.FEATURES

    def __init__(self, in_channels: Sequence[int], num_classes: int, strides: Optional[Sequence[int]] = None,
                 fpn_channels: int = 256, representation_size: int = 1024, mask_channels: int = 256,
                 min_size: Union[int, Sequence[int]] = 800, max_size: int = 1333, with_masks: bool = True,
                 anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512), rpn_post_nms_top_n_train: int = 1000,
                 box_score_thresh: float = 0.05, box_detections_per_img: int = 100,
                 image_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 image_std: Sequence[float] = IMAGENET_DEFAULT_STD) -> None:
        super().__init__()
        in_channels = list(in_channels)
        if strides is not None and list(strides) != sorted(strides):
            raise ValueError(f"MaskRCNN: feature levels must be ordered finest first, got strides {list(strides)}")
        if len(anchor_sizes) != len(in_channels) + 1:
            raise ValueError(f"MaskRCNN: {len(in_channels)} backbone levels give {len(in_channels) + 1} FPN levels, "
                             f"but anchor_sizes has {len(anchor_sizes)} entries")
        min_size = tuple(min_size) if isinstance(min_size, Sequence) else (min_size,)
        self.with_masks = with_masks
        self.transform = MMDetTransform(min_size, max_size, list(image_mean), list(image_std))
        self.fpn = FeaturePyramidNetwork(in_channels, fpn_channels, extra_blocks=LastLevelMaxPool())
        for module in self.fpn.modules():
            if isinstance(module, nn.Conv2d):  # mmdet's FPN init (Xavier uniform, zero bias)
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        level_strides = [*strides, 2 * strides[-1]] if strides is not None else [4 * 2 ** i for i in
                                                                                   range(len(anchor_sizes))]
        anchors = MMDetAnchorGenerator([(size,) for size in anchor_sizes], [(0.5, 1.0, 2.0)] * len(anchor_sizes),
                                       level_strides)
        self.rpn = RegionProposalNetwork(
            anchors, RPNHead(fpn_channels, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256, positive_fraction=0.5,
            pre_nms_top_n=dict(training=2000, testing=1000),
            post_nms_top_n=dict(training=rpn_post_nms_top_n_train, testing=1000), nms_thresh=0.7)
        levels = [str(i) for i in range(len(in_channels))]
        self.roi_heads = RoIHeads(
            box_roi_pool=AlignedMultiScaleRoIAlign(levels, output_size=7, sampling_ratio=0),
            box_head=TwoMLPHead(fpn_channels * 7 * 7, representation_size),
            box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),
            fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=512, positive_fraction=0.25,
            bbox_reg_weights=(10.0, 10.0, 5.0, 5.0), score_thresh=box_score_thresh, nms_thresh=0.5,
            detections_per_img=box_detections_per_img)
        self.rpn.box_coder = MMDetBoxCoder(self.rpn.box_coder.weights)
        self.roi_heads.box_coder = MMDetBoxCoder(self.roi_heads.box_coder.weights)
        if with_masks:
            self.roi_heads.mask_roi_pool = AlignedMultiScaleRoIAlign(levels, output_size=14, sampling_ratio=0)
            self.roi_heads.mask_head = MaskRCNNHeads(fpn_channels, [mask_channels] * 4, dilation=1)
            self.roi_heads.mask_predictor = MaskRCNNPredictor(mask_channels, mask_channels, num_classes + 1)

    def forward(self, features: Sequence[Tensor], images: ImageList, targets: Targets = None
                ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        """Losses (training, given targets) and detections (evaluation) in the transformed image frame."""
        pyramid = self.fpn(OrderedDict((str(i), x) for i, x in enumerate(features)))
        proposals, rpn_losses = self.rpn(images, pyramid, targets)
        detections, roi_losses = self.roi_heads(pyramid, proposals, images.image_sizes, targets)
        return {**rpn_losses, **roi_losses}, detections


# mmdet 3.x Mask R-CNN keys (FPN neck, RPNHead, Shared2FCBBoxHead, FCNMaskHead) -> this module's torchvision names.
MMDET_KEY_RULES: KeyRules = [
    (r"^neck\.lateral_convs\.(\d+)\.conv\.", r"fpn.inner_blocks.\1.0."),
    (r"^neck\.fpn_convs\.(\d+)\.conv\.", r"fpn.layer_blocks.\1.0."),
    (r"^rpn_head\.rpn_conv\.", "rpn.head.conv.0.0."),
    (r"^rpn_head\.rpn_cls\.", "rpn.head.cls_logits."),
    (r"^rpn_head\.rpn_reg\.", "rpn.head.bbox_pred."),
    (r"^roi_head\.bbox_head\.shared_fcs\.0\.", "roi_heads.box_head.fc6."),
    (r"^roi_head\.bbox_head\.shared_fcs\.1\.", "roi_heads.box_head.fc7."),
    (r"^roi_head\.bbox_head\.fc_cls\.", "roi_heads.box_predictor.cls_score."),
    (r"^roi_head\.bbox_head\.fc_reg\.", "roi_heads.box_predictor.bbox_pred."),
    (r"^roi_head\.mask_head\.convs\.(\d+)\.conv\.", r"roi_heads.mask_head.\1.0."),
    (r"^roi_head\.mask_head\.upsample\.", "roi_heads.mask_predictor.conv5_mask."),
    (r"^roi_head\.mask_head\.conv_logits\.", "roi_heads.mask_predictor.mask_fcn_logits."),
]
MMDET_PREFIXES = ("neck.", "rpn_head.", "roi_head.")


def _background_first(key: str, value: Tensor) -> Tensor:
    """mmdet's class layout -> torchvision's: mmdet puts background last in the classifier and has no background
    box deltas or mask channel; torchvision has background first everywhere (its deltas/mask unused, zero)."""
    if key.startswith("roi_heads.box_predictor.cls_score."):
        return torch.cat([value[-1:], value[:-1]])
    if key.startswith("roi_heads.box_predictor.bbox_pred."):
        return torch.cat([value.new_zeros((4, *value.shape[1:])), value])
    if key.startswith("roi_heads.mask_predictor.mask_fcn_logits."):
        return torch.cat([value.new_zeros((1, *value.shape[1:])), value])
    return value


def from_mmdet(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The head keys of an mmdet Mask R-CNN's state dict (``neck.*``, ``rpn_head.*``, ``roi_head.*``) in this
    module's names and class layout; keys the table does not know keep their names (a strict load names them)."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(MMDET_PREFIXES):
            ours = rename_key(key, MMDET_KEY_RULES)
            out[ours] = _background_first(ours, value)
    return out
