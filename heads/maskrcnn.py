"""Mask R-CNN with FPN on any backbone's multi-scale features, from torchvision's detection components.

Everything after the backbone: torchvision's ``GeneralizedRCNNTransform`` (resize, normalise, pad to 32),
an FPN (256 channels, 5 levels: the 4 backbone levels plus a stride-2 max-pooled level, as mmdet's
``FPN(num_outs=5)``), the RPN and the RoI heads. Settings follow mmdet's ``mask-rcnn_r50_fpn`` base that
the vision-Mamba repositories train with: anchors 32-512 (one size per level) x ratios 0.5/1/2; RPN 256
samples (half positive, IoU 0.7/0.3), 2000 proposals per level before NMS 0.7 and 1000 after in training,
1000/1000 at test; RoI heads 512 samples (a quarter positive, IoU 0.5), RoIAlign 7 (boxes) and 14
(masks) with adaptive sampling, two 1024-wide FC layers, four 256-channel 3x3 mask convs, 28x28 masks;
test score threshold 0.05, NMS 0.5, 100 detections, mask threshold 0.5 (applied by the task). Losses are
torchvision's (smooth L1 for boxes where mmdet uses L1). Runs on CPU with torchvision's own ops.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence, Union

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .interface import HeadInputs

Targets = Optional[list[dict[str, Tensor]]]


class MaskRCNN(nn.Module):
    """Mask R-CNN (or Faster R-CNN with ``with_masks=False``) head on backbone features.

    The task runs ``images, targets = head.transform(images, targets)``, the backbone on
    ``images.tensors``, then ``head(features, images, targets)``, and maps detections back to the original
    image sizes with ``head.transform.postprocess``.

    Args:
        in_channels: channels of each backbone level (run.py passes ``feature_info.channels()``).
        num_classes: object classes, without background (labels in targets are 1..num_classes).
        strides: stride of each backbone level (run.py passes ``feature_info.reduction()``); RoIAlign scales
            are inferred from the feature sizes, so this is only checked.
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
        self.transform = GeneralizedRCNNTransform(min_size, max_size, list(image_mean), list(image_std))
        self.fpn = FeaturePyramidNetwork(in_channels, fpn_channels, extra_blocks=LastLevelMaxPool())
        for module in self.fpn.modules():
            if isinstance(module, nn.Conv2d):  # mmdet's FPN init (Xavier uniform, zero bias)
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        anchors = AnchorGenerator(tuple((size,) for size in anchor_sizes), ((0.5, 1.0, 2.0),) * len(anchor_sizes))
        self.rpn = RegionProposalNetwork(
            anchors, RPNHead(fpn_channels, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256, positive_fraction=0.5,
            pre_nms_top_n=dict(training=2000, testing=1000),
            post_nms_top_n=dict(training=rpn_post_nms_top_n_train, testing=1000), nms_thresh=0.7)
        levels = [str(i) for i in range(len(in_channels))]
        self.roi_heads = RoIHeads(
            box_roi_pool=MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=0),
            box_head=TwoMLPHead(fpn_channels * 7 * 7, representation_size),
            box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),
            fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=512, positive_fraction=0.25,
            bbox_reg_weights=None, score_thresh=box_score_thresh, nms_thresh=0.5,
            detections_per_img=box_detections_per_img)
        if with_masks:
            self.roi_heads.mask_roi_pool = MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=0)
            self.roi_heads.mask_head = MaskRCNNHeads(fpn_channels, [mask_channels] * 4, dilation=1)
            self.roi_heads.mask_predictor = MaskRCNNPredictor(mask_channels, mask_channels, num_classes + 1)

    def forward(self, features: Sequence[Tensor], images: ImageList, targets: Targets = None
                ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        """Losses (training, given targets) and detections (evaluation) in the transformed image frame."""
        pyramid = self.fpn(OrderedDict((str(i), x) for i, x in enumerate(features)))
        proposals, rpn_losses = self.rpn(images, pyramid, targets)
        detections, roi_losses = self.roi_heads(pyramid, proposals, images.image_sizes, targets)
        return {**rpn_losses, **roi_losses}, detections
