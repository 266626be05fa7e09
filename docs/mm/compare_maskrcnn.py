"""Measure what still differs end to end between mmdet's Mask R-CNN and mambalab's (heads.MaskRCNN, torchvision's
components) when both hold the same weights; docs/mm/README.md quotes the output.

    python docs/mm/compare_maskrcnn.py        # with the mm extra; about a minute on 2 CPU cores

Both models are built from the documented mmdet config with the tiny ``test_vmamba`` backbone (shared, so the
features are identical) and mmdet's initialisation of the neck and heads (seeded; the classifier and mask logits
scaled up so that detections pass the 0.05 score threshold and masks are not all near 0.5). Module by module the
two agree to 1e-4 (tests/test_mm.py); this script measures the parts that are not the same code: the test-time
resize, the proposal filtering, the detection post-processing and the pasting of masks into the image.
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from pathlib import Path

import mmcv
import numpy as np
import torch
from mmdet.models.roi_heads.mask_heads.fcn_mask_head import _do_paste_mask
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmengine.config import Config
from mmengine.logging import MMLogger
from mmengine.registry import init_default_scope
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import box_iou

import backbones.mm  # noqa: F401  (registers MambaLabBackbone)
from heads.maskrcnn import MaskRCNN, MMDetTransform, from_mmdet, paste_masks

CONFIG = Path(__file__).resolve().parent / "mask-rcnn_vmamba_tiny_s1l8_fpn_1x_coco.py"
MEAN, STD = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])


def build(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module, MaskRCNN]:
    """mmdet's model and ours sharing one backbone and the same (random) neck and head weights."""
    cfg = Config.fromfile(str(CONFIG))
    cfg.model.backbone.update(name="test_vmamba", drop_path_rate=0.0)
    cfg.model.neck.in_channels = [8, 16, 32, 64]
    init_default_scope("mmdet")
    torch.manual_seed(seed)
    reference = MODELS.build(cfg.model)
    MMLogger.get_current_instance().setLevel(logging.WARNING)  # init_weights logs every tensor otherwise
    reference.init_weights()  # mmdet's own initialisation of the neck and heads
    reference.eval()
    with torch.no_grad():  # sharper than at initialisation: detections pass score 0.05, masks are not all ~0.5
        reference.roi_head.bbox_head.fc_cls.weight.mul_(30)
        reference.roi_head.mask_head.conv_logits.weight.mul_(30)
    backbone = reference.backbone.body
    ours = MaskRCNN(backbone.feature_info.channels(), 80, strides=backbone.feature_info.reduction()).eval()
    ours.load_state_dict(from_mmdet(reference.state_dict()))
    return reference, backbone, ours


def picture(seed: int, height: int = 480, width: int = 640) -> np.ndarray:
    """A uint8 RGB image of flat rectangles on noise (things with edges, as in photographs)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, (height, width, 3)).astype(np.uint8)
    for _ in range(12):
        y, x = rng.integers(0, height - 40), rng.integers(0, width - 40)
        image[y:y + rng.integers(30, 200), x:x + rng.integers(30, 260)] = rng.integers(60, 255, 3)
    return image


def resize_difference(image: np.ndarray) -> tuple[tuple, tuple, tuple, float]:
    """mmdet's test resize (mmcv.imrescale of the uint8 image, then normalise) against ours (normalise, then
    MMDetTransform) and torchvision's own transform: sizes and the largest difference in normalised units."""
    resized = mmcv.imrescale(image, (1333, 800), interpolation="bilinear")
    expected = torch.from_numpy(((resized - MEAN) / STD).astype(np.float32)).permute(2, 0, 1)
    tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    mean, std = list(MEAN / 255), list(STD / 255)
    ours, plain = MMDetTransform(800, 1333, mean, std).eval(), GeneralizedRCNNTransform(800, 1333, mean, std).eval()
    got = ours.resize(ours.normalize(tensor))[0]
    plain = plain.resize(plain.normalize(tensor))[0]
    diff = float((got - expected).abs().max()) if got.shape == expected.shape else float("nan")
    return tuple(expected.shape[-2:]), tuple(got.shape[-2:]), tuple(plain.shape[-2:]), diff


def compare(seed: int, reference, backbone, ours) -> dict:
    """Proposals, detections and masks of both models on one preprocessed image (mmdet's preprocessing)."""
    image = picture(seed)
    resized = mmcv.imrescale(image, (1333, 800), interpolation="bilinear")
    height, width = resized.shape[:2]
    sample = DetDataSample(metainfo=dict(img_shape=(height, width), ori_shape=(height, width), scale_factor=(1.0, 1.0),
                                         pad_shape=(height, width), batch_input_shape=(height, width)))
    data = reference.data_preprocessor(dict(inputs=[torch.from_numpy(resized[..., ::-1].copy()).permute(2, 0, 1)],
                                            data_samples=[sample]), training=False)
    inputs, samples = data["inputs"], data["data_samples"]
    with torch.no_grad():
        features = backbone(inputs)
        pyramid = ours.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))
        images = ImageList(inputs, [(height, width)])
        proposals = ours.rpn(images, pyramid)[0][0]
        neck = reference.neck(reference.backbone(inputs))
        expected_proposals = reference.rpn_head.predict(neck, samples, rescale=False)[0].bboxes
        _, detections = ours(features, images)
        detections = ours.transform.postprocess(detections, [(height, width)], [(height, width)])[0]
        expected = reference.predict(inputs, samples, rescale=True)[0].pred_instances
    iou = box_iou(proposals, expected_proposals)
    same_proposals = float((iou.max(1).values > 0.99).float().mean()) if len(proposals) else float("nan")
    matches = []
    if len(detections["boxes"]) and len(expected.bboxes):
        iou = box_iou(detections["boxes"], expected.bboxes)
        same_label = detections["labels"][:, None] - 1 == expected.labels[None, :]
        best = torch.where(same_label, iou, torch.zeros_like(iou)).max(1)
        matches = [(i, int(j)) for i, (v, j) in enumerate(zip(best.values, best.indices)) if v > 0.99]
    mask_iou = []
    for i, j in matches:
        a, b = detections["masks"][i, 0] >= 0.5, expected.masks[j].bool()
        union = (a | b).sum()
        mask_iou.append(float((a & b).sum() / union) if union else 1.0)
    score_diff = max((abs(float(detections["scores"][i] - expected.scores[j])) for i, j in matches), default=0.0)
    return dict(proposals=(len(proposals), len(expected_proposals), same_proposals),
                detections=(len(detections["boxes"]), len(expected.bboxes), len(matches), score_diff),
                mask_iou=float(np.mean(mask_iou)) if mask_iou else float("nan"))


def paste_difference(seed: int, count: int = 100, size: tuple = (800, 1067)) -> tuple[float, float]:
    """Mean IoU with mmdet's pasting of masks pasted from the same 28x28 probabilities and boxes: ours
    (heads.maskrcnn.paste_masks) and torchvision's ``paste_masks_in_image``."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.nn.functional.interpolate(torch.randn(count, 1, 7, 7, generator=g) * 4, size=(28, 28),
                                             mode="bilinear", align_corners=False)
    probabilities = logits.sigmoid()
    corner = torch.rand(count, 2, generator=g) * torch.tensor([size[1] - 300, size[0] - 300])
    boxes = torch.cat([corner, corner + 20 + torch.rand(count, 2, generator=g) * 280], 1)
    theirs = _do_paste_mask(probabilities, boxes, *size, skip_empty=False)[0] >= 0.5

    def iou(masks: torch.Tensor) -> float:
        inter, union = (masks & theirs).flatten(1).sum(1), (masks | theirs).flatten(1).sum(1)
        return float((inter / union.clamp_min(1)).mean())

    return (iou(paste_masks(probabilities, boxes, size)[:, 0] >= 0.5),
            iou(paste_masks_in_image(probabilities, boxes, size)[:, 0] >= 0.5))


def main() -> None:
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    reference, backbone, ours = build()
    print("| image | resize mmdet / ours / torchvision default | max diff (normalised) | proposals ours / mmdet / "
          "same | detections ours / mmdet / matched | max score diff | mask IoU of matched |")
    print("|---|---|---|---|---|---|---|")
    for seed in range(3):
        sizes = resize_difference(picture(seed))
        result = compare(seed, reference, backbone, ours)
        p, d = result["proposals"], result["detections"]
        print(f"| {seed} | {sizes[0]} / {sizes[1]} / {sizes[2]} | {sizes[3]:.4f} | {p[0]} / {p[1]} / {p[2]:.1%} | "
              f"{d[0]} / {d[1]} / {d[2]} | {d[3]:.2e} | {result['mask_iou']:.4f} |")
    ours, torchvision = paste_difference(0)
    print(f"\nmask pasting alone (same probabilities and boxes, 100 masks of 20-300 px), mean IoU with mmdet's: "
          f"ours {ours:.4f}, torchvision's paste_masks_in_image {torchvision:.4f}")


if __name__ == "__main__":
    main()
