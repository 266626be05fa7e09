"""Pictures of what a model predicted beside what it should have, for every task: one class palette, label
maps and detections painted over the image, and panels written side by side as one PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Collection, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

Array = Union[np.ndarray, Tensor]


def palette(num_colours: int) -> np.ndarray:
    """PASCAL VOC's colour map as ``(num_colours, 3)`` uint8: colour k spreads the bits of k over the high bits
    of red, green and blue in turn, so neighbouring class numbers get clearly different colours."""
    colours = np.zeros((num_colours, 3), dtype=np.uint8)
    for index in range(num_colours):
        value, shift = index, 7
        while value:
            for channel in range(3):
                colours[index, channel] |= ((value >> channel) & 1) << shift
            value >>= 3
            shift -= 1
    return colours


def to_uint8_image(image: Array, mean: Optional[Sequence[float]] = None,
                   std: Optional[Sequence[float]] = None) -> np.ndarray:
    """A ``(C, H, W)`` or ``(H, W)`` image as ``(H, W, 3)`` uint8: de-normalised with ``mean``/``std`` (values on
    the 0-1 scale are taken as fractions of 255), or min-max scaled over the whole image when they are None."""
    image = (image.detach().cpu().float() if isinstance(image, Tensor)
             else torch.from_numpy(np.asarray(image, dtype=np.float32)))
    image = image[None] if image.ndim == 2 else image
    if mean is not None and std is not None:
        image = image * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
        if max(mean) <= 1.0:
            image = image * 255
    else:
        low, high = image.min(), image.max()
        image = (image - low) / (high - low).clamp_min(1e-6) * 255
    image = image.clamp(0, 255).round().byte()
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image[:3].permute(1, 2, 0).numpy()


def paint_labels(image: np.ndarray, labels: Array, colours: np.ndarray, skip: Collection[int] = (),
                 alpha: float = 0.5) -> np.ndarray:
    """``(H, W, 3)`` uint8 image with each pixel of class k blended with ``colours[k]``; labels in ``skip``
    (background, ignore_index) and labels without a colour are left as they are."""
    labels = labels.cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    painted = (labels < len(colours)) & ~np.isin(labels, list(skip))
    out = image.astype(np.float32)
    out[painted] = (1 - alpha) * out[painted] + alpha * colours[labels[painted]]
    return out.astype(np.uint8)


def draw_detections(image: Tensor, detections: dict[str, Tensor], class_names: Sequence[str],
                    score_threshold: float = 0.3, mask_threshold: float = 0.5) -> np.ndarray:
    """``(H, W, 3)`` uint8 picture of an image in [0, 1] with boxes, class names and (when present) masks in the
    class palette; boxes with scores are predictions (yellow), boxes without are ground truth (green)."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    picture = (image.detach().float().cpu().clamp(0, 1) * 255).round().byte()
    if picture.shape[0] == 1:
        picture = picture.expand(3, -1, -1)
    scores = detections.get("scores")
    keep = scores >= score_threshold if scores is not None else torch.ones(len(detections["boxes"]), dtype=torch.bool)
    boxes, labels = detections["boxes"][keep].detach().cpu(), detections["labels"][keep].detach().cpu()
    if "masks" in detections and keep.any():
        masks = detections["masks"][keep].detach().cpu()
        masks = (masks[:, 0] if masks.ndim == 4 else masks).float() > mask_threshold
        colours = palette(int(labels.max()) + 1)
        picture = draw_segmentation_masks(picture, masks, alpha=0.45,
                                          colors=[tuple(int(c) for c in colours[label]) for label in labels])
    names = [class_names[int(label) - 1] if 0 < int(label) <= len(class_names) else str(int(label))
             for label in labels]
    if scores is not None:
        names = [f"{name} {float(score):.2f}" for name, score in zip(names, scores[keep].detach().cpu())]
    picture = draw_bounding_boxes(picture, boxes, labels=names, colors="yellow" if scores is not None else "lime",
                                  width=2)
    return picture.permute(1, 2, 0).numpy()


def write_panels(path: Path, panels: Sequence[np.ndarray]) -> Path:
    """Save ``(H, W, 3)`` uint8 panels of one height side by side as a PNG at ``path`` (folders created)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(list(panels), axis=1)).save(path)
    return path
