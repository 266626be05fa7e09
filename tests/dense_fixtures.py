"""Tiny dense-prediction data in the released on-disk formats, and the plain backbone dense heads are tested on.

- ``make_ade20k``: ``ADEChallengeData2016/{images,annotations}/{training,validation}`` with JPEG images and
  uint8 PNG label maps (0 = unlabelled, 1..150 classes).
- ``make_coco``: ``annotations/instances_{train,val}2017.json`` (polygon and crowd-RLE segmentations, sparse
  category ids) with ``train2017/`` and ``val2017/`` JPEGs.
- ``make_nuclei`` / ``make_trees``: the demo data files as stardist and deepforest ship them.
- ``plain_backbone``: the plain family (Vim) as dense heads see it, through its simple feature pyramid.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

COCO_CATEGORIES = [{"id": 1, "name": "person", "supercategory": "person"},
                   {"id": 3, "name": "car", "supercategory": "vehicle"},
                   {"id": 7, "name": "train", "supercategory": "vehicle"}]


def _blocks_label(rng: np.random.Generator, height: int, width: int, num_classes: int = 150) -> np.ndarray:
    """A label map of a few rectangles of random classes (0 = unlabelled included)."""
    label = np.zeros((height, width), np.uint8)
    for _ in range(6):
        y, x = rng.integers(0, height - 4), rng.integers(0, width - 4)
        h, w = rng.integers(4, height // 2 + 4), rng.integers(4, width // 2 + 4)
        label[y:y + h, x:x + w] = rng.integers(1, num_classes + 1)
    return label


def make_ade20k(root: Path, n_train: int = 4, n_val: int = 2, size: tuple[int, int] = (48, 64),
                seed: int = 0, mixed_sizes: bool = True, num_classes: int = 150) -> Path:
    """ADE20K in its released layout under ``root``; returns ``root``. With ``mixed_sizes`` every second image
    is portrait (``size`` transposed), else all are ``size``; labels use classes 1..``num_classes``."""
    rng = np.random.default_rng(seed)
    base = Path(root) / "ADEChallengeData2016"
    for split, count in (("training", n_train), ("validation", n_val)):
        (base / "images" / split).mkdir(parents=True, exist_ok=True)
        (base / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            height, width = size if i % 2 == 0 or not mixed_sizes else (size[1], size[0])  # portrait and landscape
            label = _blocks_label(rng, height, width, num_classes)
            image = (rng.integers(0, 60, (height, width, 3)) + (label[..., None] * 37 % 196)).astype(np.uint8)
            stem = f"ADE_{'train' if split == 'training' else 'val'}_{i + 1:08d}"
            Image.fromarray(image).save(base / "images" / split / f"{stem}.jpg", quality=95)
            Image.fromarray(label).save(base / "annotations" / split / f"{stem}.png")
    return Path(root)


def _polygon(x: float, y: float, w: float, h: float) -> list[float]:
    """A diamond inside the box (a polygon whose mask differs from the box)."""
    return [x + w / 2, y, x + w, y + h / 2, x + w / 2, y + h, x, y + h / 2]


def make_coco(root: Path, n_train: int = 3, n_val: int = 2, size: tuple[int, int] = (64, 80),
              seed: int = 0, mixed_sizes: bool = False) -> Path:
    """COCO 2017 instances layout under ``root`` (3 categories with ids 1, 3, 7); returns ``root``.

    Images are ``size``, or with ``mixed_sizes`` every second one ``size`` transposed (portrait).
    Each image holds two or three bright rectangles (polygon annotations); the first validation image also
    has a crowd annotation (uncompressed RLE) and the last training image one of width 0.5 (dropped).
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    ann_id = 1
    for split, count in (("train2017", n_train), ("val2017", n_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            height, width = size if i % 2 == 0 or not mixed_sizes else (size[1], size[0])
            image_id = (100 if split == "val2017" else 0) + i + 1
            picture = rng.integers(0, 40, (height, width, 3)).astype(np.uint8)
            for k in range(2 + i % 2):
                w, h = int(rng.integers(12, width // 2)), int(rng.integers(12, height // 2))
                x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
                category = COCO_CATEGORIES[k % len(COCO_CATEGORIES)]["id"]
                picture[y:y + h, x:x + w] = 80 * (k + 1)
                annotations.append({"id": ann_id, "image_id": image_id, "category_id": category,
                                    "bbox": [x, y, w, h], "area": float(w * h / 2), "iscrowd": 0,
                                    "segmentation": [_polygon(x, y, w, h)]})
                ann_id += 1
            if split == "val2017" and i == 0:
                crowd = np.zeros((height, width), np.uint8)
                crowd[2:10, 2:20] = 1
                annotations.append({"id": ann_id, "image_id": image_id, "category_id": 1, "bbox": [2, 2, 18, 8],
                                    "area": 144.0, "iscrowd": 1,
                                    "segmentation": {"size": [height, width],
                                                     "counts": _uncompressed_counts(crowd)}})
                ann_id += 1
            if split == "train2017" and i == count - 1:
                annotations.append({"id": ann_id, "image_id": image_id, "category_id": 3, "bbox": [5, 5, 0.5, 9],
                                    "area": 4.5, "iscrowd": 0, "segmentation": [_polygon(5, 5, 0.5, 9)]})
                ann_id += 1
            file_name = f"{image_id:012d}.jpg"
            Image.fromarray(picture).save(root / split / file_name, quality=95)
            images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        data = {"images": images, "annotations": annotations, "categories": COCO_CATEGORIES}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE counts (column-major runs, starting with zeros)."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return counts


def make_nuclei(folder: Path, size: int = 64) -> Path:
    """A 16-bit image and instance mask named as stardist ships them (img2d.tif, mask2d.tif)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = np.zeros((size, size), np.uint16)
    for k in range(1, 9):
        y, x = rng.integers(0, size - 8, 2)
        labels[y:y + 6, x:x + 6] = k
    image = (rng.integers(0, 20, (size, size)) + 200 * (labels > 0)).astype(np.uint16)
    Image.fromarray(image).save(folder / "img2d.tif")
    Image.fromarray(labels).save(folder / "mask2d.tif")
    return folder


def make_trees(folder: Path) -> Path:
    """The four deepforest images (120x150 PNGs) with three VOC boxes each, named as deepforest ships them."""
    from datamodules.trees import IMAGES

    folder.mkdir(parents=True, exist_ok=True)
    for name in IMAGES:
        Image.fromarray(np.full((120, 150, 3), 90, np.uint8)).save(folder / f"{name}.png")
        objects = "".join(f"<object><name>Tree</name><bndbox><xmin>{x}</xmin><ymin>10</ymin><xmax>{x + 20}</xmax>"
                          f"<ymax>40</ymax></bndbox></object>" for x in (5, 60, 110))
        (folder / f"{name}.xml").write_text(f"<annotation><filename>{name}.png</filename>{objects}</annotation>")
    return folder


def plain_backbone(in_chans: int = 3) -> nn.Module:
    """The plain (single-scale) family's test variant: Vim with its simple feature pyramid (strides 4-32)."""
    import timm

    import backbones  # noqa: F401  (registers test_vim)

    torch.manual_seed(0)
    return timm.create_model("test_vim", features_only=True, in_chans=in_chans)
