"""COCO instances (boxes and masks) in the released layout, for Mask R-CNN.

Layout::

    <root>/annotations/instances_train2017.json
    <root>/annotations/instances_val2017.json
    <root>/train2017/*.jpg
    <root>/val2017/*.jpg

Categories (80 for COCO, with sparse ids) become labels 1..K in id order; 0 is torchvision's background.
An annotation with a category id the file does not list is refused when the file is read, naming the
annotation and the id. Training follows mmdet's ``CocoDataset``: crowd annotations and boxes under 1 pixel
wide or high are dropped, and images without any remaining object or smaller than 32 pixels are skipped;
evaluation keeps every other annotation with its ``iscrowd`` flag and ``area`` so COCO's rules apply. In both,
boxes with no pixel inside their image are dropped too; what was dropped, and boxes reaching beyond their
image, are logged once per split (``datamodules.checks.BoxReport``). Samples are
``(image, target)``: a float ``(3, H, W)`` image in [0, 1] (the model normalises and resizes it) and a
torchvision target dict (``boxes`` xyxy, ``labels``, ``masks`` (N, H, W) uint8, ``image_id``, ``area``,
``iscrowd``).

Training augmentation: horizontal flip with probability ``flip_prob``; with ``crop_prob`` (0.5 in the
3x multi-scale recipe, mmdet's DETR-style branch) a random crop whose side, measured after resizing the
shorter side to one of ``crop_scales``, lies in ``crop_size_range``. The final multi-scale resize is the
model's (``MaskRCNN.min_size``).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .checks import BoxReport
from .readers import read_image
from .resumable import SplitLoaders, seed_for

Target = dict[str, Tensor]


def load_coco_json(path: Path) -> Any:
    """A pycocotools ``COCO`` index of an instances JSON; missing or malformed files are named."""
    from pycocotools.coco import COCO

    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot parse COCO annotation file {path}: {err}") from err
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data, dict) or key not in data]
    if missing:
        raise ValueError(f"COCO annotation file {path} lacks the key(s) {missing} of the instances format")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def annotation_mask(coco: Any, annotation: dict, path: Path) -> np.ndarray:
    """An annotation's polygon or RLE segmentation as an ``(H, W)`` uint8 mask, naming the file on error."""
    try:
        return coco.annToMask(annotation)
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise ValueError(f"{path}: annotation {annotation.get('id')} has an invalid segmentation ({err})") from err


def crop_target(target: Target, top: int, left: int, height: int, width: int) -> Target:
    """Crop boxes (shifted and clipped, empty ones dropped) and masks to a window."""
    boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    out = {key: value[keep] for key, value in target.items() if key not in ("boxes", "masks", "image_id")}
    out["boxes"], out["image_id"] = boxes[keep], target["image_id"]
    if "masks" in target:
        out["masks"] = target["masks"][keep, top:top + height, left:left + width]
    return out


def flip_target(target: Target, width: int) -> Target:
    """Mirror boxes and masks horizontally in an image ``width`` pixels wide."""
    out = dict(target)
    out["boxes"] = torch.stack([width - target["boxes"][:, 2], target["boxes"][:, 1],
                                width - target["boxes"][:, 0], target["boxes"][:, 3]], dim=1)
    if "masks" in target:
        out["masks"] = target["masks"].flip(-1)
    return out


def random_scaled_crop(image: Tensor, target: Target, rng: np.random.Generator, scales: Sequence[int],
                       size_range: Sequence[int], max_size: int) -> tuple[Tensor, Target]:
    """mmdet's 3x-recipe crop: resize the shorter side to a random ``scales`` entry (longer side capped at
    ``max_size``) and crop a random window with sides in ``size_range`` there; done here at the original
    resolution with the window scaled back, since the model resizes afterwards anyway."""
    height, width = image.shape[-2:]
    factor = min(float(rng.choice(scales)) / min(height, width), max_size / max(height, width))
    scaled_h, scaled_w = round(height * factor), round(width * factor)
    crop_h = int(rng.integers(min(scaled_h, size_range[0]), min(scaled_h, size_range[1]) + 1))
    crop_w = int(rng.integers(min(scaled_w, size_range[0]), min(scaled_w, size_range[1]) + 1))
    crop_h, crop_w = min(height, max(1, round(crop_h / factor))), min(width, max(1, round(crop_w / factor)))
    top, left = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
    return image[:, top:top + crop_h, left:left + crop_w], crop_target(target, top, left, crop_h, crop_w)


def augment(image: Tensor, target: Target, rng: np.random.Generator, flip_prob: float, crop_prob: float,
            crop_scales: Sequence[int], crop_size_range: Sequence[int], max_size: int) -> tuple[Tensor, Target]:
    """The training augmentation shared by the COCO and demo detection data: flip, then the optional crop."""
    if rng.random() < flip_prob:
        image, target = image.flip(-1), flip_target(target, image.shape[-1])
    if crop_prob and rng.random() < crop_prob:
        image, target = random_scaled_crop(image, target, rng, crop_scales, crop_size_range, max_size)
    return image, target


def collate_detection(samples: list[tuple[Tensor, Target]]) -> tuple[list[Tensor], list[Target]]:
    """Images and targets as lists (the model batches and pads them itself)."""
    images, targets = zip(*samples)
    return list(images), list(targets)


class CocoInstances(Dataset):
    """One COCO split as (image, target) pairs.

    Args:
        coco: pycocotools index of the split's JSON.
        json_path: that JSON's path (for error messages).
        image_dir: folder of the split's images.
        cat_to_label: COCO category id -> label (1..K).
        train: drop crowd/degenerate annotations and augment (flip, optional crop).
        with_masks: decode segmentation masks.
        min_size: training images with a shorter side below this are skipped.
        flip_prob: horizontal-flip probability in training.
        crop_prob: probability of the random crop in training.
        crop_scales: shorter sides the crop window is measured at.
        crop_size_range: crop window side range at that scale.
        max_size: longer-side cap used with ``crop_scales``.
        seed: augmentation seed.
    """

    def __init__(self, coco: Any, json_path: Path, image_dir: Path, cat_to_label: dict[int, int], train: bool,
                 with_masks: bool = True, min_size: int = 32, flip_prob: float = 0.5, crop_prob: float = 0.0,
                 crop_scales: Sequence[int] = (400, 500, 600), crop_size_range: Sequence[int] = (384, 600),
                 max_size: int = 1333, seed: int = 0) -> None:
        self.coco, self.json_path, self.image_dir = coco, json_path, image_dir
        self.cat_to_label, self.train, self.with_masks = cat_to_label, train, with_masks
        self.augmentation = dict(flip_prob=flip_prob, crop_prob=crop_prob, crop_scales=tuple(crop_scales),
                                 crop_size_range=tuple(crop_size_range), max_size=max_size)
        self.seed = seed
        self.boxes = BoxReport(f"COCO annotations {json_path}")
        self.annotations = {image_id: self._usable(image_id) for image_id in sorted(coco.imgs)}
        self.boxes.report()
        ids = sorted(coco.imgs)
        if train:
            ids = [i for i in ids if min(coco.imgs[i]["width"], coco.imgs[i]["height"]) >= min_size
                   and self.annotations[i]]
        self.ids = ids

    def _usable(self, image_id: int) -> list[dict]:
        """The image's annotations this split uses; unknown categories and malformed boxes are named."""
        anns = self.coco.imgToAnns.get(image_id, [])
        for ann in anns:
            if ann.get("category_id") not in self.cat_to_label:
                raise ValueError(f"{self.json_path}: annotation {ann.get('id')} has category_id "
                                 f"{ann.get('category_id')!r}, not one of the listed ids {sorted(self.cat_to_label)}")
        if self.train:
            anns = [a for a in anns if not a.get("iscrowd", 0) and a.get("area", 1) > 0]
        if not anns:
            return []
        malformed = [a.get("id") for a in anns if not isinstance(a.get("bbox"), (list, tuple)) or len(a["bbox"]) != 4
                     or not all(isinstance(v, (int, float)) for v in a["bbox"])]
        if malformed:
            raise ValueError(f"{self.json_path}: annotation {malformed[0]} has no [x, y, width, height] bbox of "
                             f"numbers")
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float64)
        info = self.coco.imgs[image_id]
        scored = np.array([not a.get("iscrowd", 0) for a in anns])
        keep = self.boxes.keep(boxes, info["height"], info["width"], scored)
        return [a for a, k in zip(anns, keep.tolist()) if k]

    def __len__(self) -> int:
        return len(self.ids)

    def target(self, image_id: int) -> Target:
        """The target dict of one image at its original size."""
        info = self.coco.imgs[image_id]
        anns = self.annotations[image_id]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                             dtype=torch.float32).reshape(-1, 4)
        target = {"boxes": boxes,
                  "labels": torch.tensor([self.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
                  "image_id": torch.tensor(image_id),
                  "area": torch.tensor([float(a.get("area", 0.0)) for a in anns], dtype=torch.float32),
                  "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64)}
        if self.with_masks:
            masks = [annotation_mask(self.coco, a, self.json_path) for a in anns]
            target["masks"] = (torch.from_numpy(np.stack(masks)) if masks
                               else torch.zeros((0, info["height"], info["width"]), dtype=torch.uint8))
        return target

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> tuple[Tensor, Target]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        image = torch.from_numpy(np.array(read_image(self.image_dir / info["file_name"], "RGB")))
        image = image.permute(2, 0, 1).float() / 255
        if tuple(image.shape[-2:]) != (info["height"], info["width"]):
            raise ValueError(f"{self.json_path}: image {info['file_name']} is {image.shape[-1]}x{image.shape[-2]} "
                             f"on disk but {info['width']}x{info['height']} in the annotations")
        target = self.target(image_id)
        if self.train:
            rng = np.random.default_rng(seed_for(self.seed, epoch, index))
            image, target = augment(image, target, rng, **self.augmentation)
        return image, target


class COCODataModule(SplitLoaders, pl.LightningDataModule):
    """COCO 2017 instance segmentation (or detection with ``with_masks=False``).

    The validation JSON is read at construction (it gives the categories); the training JSON when
    training starts. Validation and test both use ``val2017`` (test-dev labels are not public).

    Args:
        root: folder holding ``annotations/``, ``train2017/`` and ``val2017/``.
        batch_size: training images per batch (per device).
        val_batch_size: evaluation images per batch.
        num_workers: data-loading worker processes.
        with_masks: load instance masks (Mask R-CNN) or boxes only.
        flip_prob: horizontal-flip probability in training.
        crop_prob: probability of the 3x recipe's random crop in training (0 for the 1x recipe).
        crop_scales: shorter sides at which the crop window is measured.
        crop_size_range: crop window side range at that scale.
        max_size: longer-side cap used with ``crop_scales``.
        min_size: training images with a shorter side below this are skipped.
        train_split: training image folder (and ``instances_<split>.json``).
        val_split: validation image folder (and JSON).
        pin_memory: page-locked batches for faster host-to-GPU copies.
        seed: seed of the training order and augmentation.
    """

    in_chans = 3

    collate_fn = staticmethod(collate_detection)

    def __init__(self, root: str, batch_size: int = 2, val_batch_size: int = 1, num_workers: int = 4,
                 with_masks: bool = True, flip_prob: float = 0.5, crop_prob: float = 0.0,
                 crop_scales: Sequence[int] = (400, 500, 600), crop_size_range: Sequence[int] = (384, 600),
                 max_size: int = 1333, min_size: int = 32, train_split: str = "train2017",
                 val_split: str = "val2017", pin_memory: bool = False, seed: int = 0) -> None:
        super().__init__()
        self.root = Path(root).expanduser()
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.num_workers, self.pin_memory, self.seed = num_workers, pin_memory, seed
        self.with_masks = with_masks
        self.splits = {"train": train_split, "val": val_split}
        self.train_options = dict(min_size=min_size, flip_prob=flip_prob, crop_prob=crop_prob,
                                  crop_scales=tuple(crop_scales), crop_size_range=tuple(crop_size_range),
                                  max_size=max_size)
        for split in self.splits.values():
            if not (self.root / split).is_dir():
                raise FileNotFoundError(f"COCO image folder not found: {self.root / split} (expected "
                                        f"{self.root}/{{annotations,{train_split},{val_split}}})")
        self.val_coco = load_coco_json(self._json(val_split))
        categories = sorted(self.val_coco.cats.values(), key=lambda c: c["id"])
        if not categories:
            raise ValueError(f"{self._json(val_split)} lists no categories")
        self.cat_to_label = {c["id"]: i + 1 for i, c in enumerate(categories)}
        self.class_names = [c["name"] for c in categories]
        self.num_classes = len(categories)
        if not self._json(train_split).is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {self._json(train_split)}")
        self.datasets: dict[str, CocoInstances] = {}

    def _json(self, split: str) -> Path:
        return self.root / "annotations" / f"instances_{split}.json"

    def setup(self, stage: Optional[str] = None) -> None:
        if "val" not in self.datasets:
            self.datasets["val"] = CocoInstances(self.val_coco, self._json(self.splits["val"]),
                                                 self.root / self.splits["val"], self.cat_to_label, train=False,
                                                 with_masks=self.with_masks)
        if stage in (None, "fit") and "train" not in self.datasets:
            path = self._json(self.splits["train"])
            coco = load_coco_json(path)
            if sorted(coco.cats) != sorted(self.cat_to_label):
                raise ValueError(f"{path} and {self._json(self.splits['val'])} list different categories")
            self.datasets["train"] = CocoInstances(coco, path, self.root / self.splits["train"], self.cat_to_label,
                                                   train=True, with_masks=self.with_masks, seed=self.seed,
                                                   **self.train_options)
            if not len(self.datasets["train"]):
                raise ValueError(f"{path}: no training image has a usable (non-crowd, >= 1 px) annotation")
