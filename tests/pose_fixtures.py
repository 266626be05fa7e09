"""Tiny COCO person-keypoint data in the released on-disk formats.

``make_coco_keypoints`` writes ``annotations/person_keypoints_{train,val}2017.json`` (the released person
category with its 17 keypoint names and skeleton; per person 51 keypoint values with v = 0/1/2,
``num_keypoints``, ``bbox``, ``area``, ``iscrowd``, polygon segmentation), JPEG images in ``train2017/`` and
``val2017/`` showing the people as stick figures, and ``person_detection_results/
COCO_val2017_detections_AP_H_56_person.json`` in the COCO results format of that file.

Special cases: one person per split has no labelled keypoint (skipped in training, ignored by the
evaluation), the first validation image has a crowd region (uncompressed RLE), and the detections hold a
second, shifted and lower-scoring box on the first validation person (OKS-NMS removes its pose), a
non-person detection (ignored) and a low-scoring background box.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from datamodules.coco_keypoints import COCO_KEYPOINTS, COCO_SKELETON, DETECTIONS_FILE
from tests.dense_fixtures import _uncompressed_counts

# A standing person in a unit-height box (x, y), nose first, COCO order; x grows to the image's right,
# so the person faces the viewer (their left side on the image's right).
TEMPLATE = np.array([[0.50, 0.08], [0.54, 0.05], [0.46, 0.05], [0.58, 0.07], [0.42, 0.07], [0.66, 0.22],
                     [0.34, 0.22], [0.72, 0.40], [0.28, 0.40], [0.74, 0.56], [0.26, 0.56], [0.60, 0.55],
                     [0.40, 0.55], [0.61, 0.76], [0.39, 0.76], [0.62, 0.97], [0.38, 0.97]])
PERSON_CATEGORY = {"id": 1, "name": "person", "supercategory": "person", "keypoints": list(COCO_KEYPOINTS),
                   "skeleton": [list(pair) for pair in COCO_SKELETON]}


def person_keypoints(rng: np.random.Generator, x: float, y: float, height: float) -> np.ndarray:
    """``(17, 2)`` keypoints of a person ``height`` pixels tall with the top-left of its box at (x, y)."""
    jitter = rng.normal(0, 0.015, TEMPLATE.shape)
    return np.array([x, y]) + (TEMPLATE + jitter) * height


def draw_person(draw: ImageDraw.ImageDraw, keypoints: np.ndarray, visible: np.ndarray) -> None:
    """Limbs as lines, labelled keypoints as dots coloured by their index (left and right differ)."""
    for a, b in COCO_SKELETON:
        draw.line([tuple(keypoints[a - 1]), tuple(keypoints[b - 1])], fill=(200, 200, 200), width=2)
    for k, ((x, y), label) in enumerate(zip(keypoints, visible)):
        if label:
            colour = (40 + 12 * k, 255 - 12 * k, 120 if k % 2 else 240)
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)


def _annotation(ann_id: int, image_id: int, keypoints: np.ndarray, visible: np.ndarray) -> dict:
    values = np.concatenate([np.where(visible[:, None] > 0, keypoints, 0.0), visible[:, None]], axis=1)
    labelled = keypoints[visible > 0] if (visible > 0).any() else keypoints
    (x1, y1), (x2, y2) = labelled.min(0) - 4, labelled.max(0) + 4
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
            "keypoints": [round(float(v), 2) for v in values.reshape(-1)], "num_keypoints": int((visible > 0).sum()),
            "bbox": [round(float(v), 2) for v in (x1, y1, x2 - x1, y2 - y1)],
            "area": round(float((x2 - x1) * (y2 - y1) * 0.6), 2),
            "segmentation": [[float(x1), float(y1), float(x2), float(y1), float(x2), float(y2), float(x1), float(y2)]]}


def make_coco_keypoints(root: Path, n_train: int = 4, n_val: int = 3, size: tuple[int, int] = (120, 160),
                        seed: int = 0) -> Path:
    """COCO 2017 person-keypoint layout under ``root`` (module docstring); returns ``root``.

    Images are ``size`` (height, width) with one or two people each.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    height, width = size
    ann_id, detections = 1, []
    for split, count in (("train2017", n_train), ("val2017", n_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            image_id = (1000 if split == "val2017" else 0) + 10 * (i + 1)
            picture = Image.fromarray(rng.integers(0, 50, (height, width, 3)).astype(np.uint8))
            draw = ImageDraw.Draw(picture)
            for person in range(1 + i % 2):
                tall = float(rng.uniform(0.55, 0.8) * height)
                x = float(person * width / 2 + rng.uniform(0, width / 2 - 0.8 * tall))
                y = float(rng.uniform(0, height - tall))
                keypoints = person_keypoints(rng, x, y, tall)
                visible = np.where(rng.random(17) < 0.15, 1.0, 2.0)
                visible[rng.random(17) < 0.1] = 0.0
                if count > 1 and i == count - 1 and person == 0:  # nobody's keypoints labelled
                    visible[:] = 0.0
                draw_person(draw, keypoints, visible)
                annotation = _annotation(ann_id, image_id, keypoints, visible)
                annotations.append(annotation)
                ann_id += 1
                if split == "val2017" and annotation["num_keypoints"]:
                    bx, by, bw, bh = annotation["bbox"]
                    detections.append({"image_id": image_id, "category_id": 1, "score": 0.95 - 0.01 * len(detections),
                                       "bbox": [bx + float(rng.normal(0, 1)), by + float(rng.normal(0, 1)), bw, bh]})
            if split == "val2017" and i == 0:
                crowd = np.zeros((height, width), np.uint8)
                crowd[2:12, 2:30] = 1
                annotations.append({"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 1,
                                    "keypoints": [0] * 51, "num_keypoints": 0, "bbox": [2, 2, 28, 10], "area": 280.0,
                                    "segmentation": {"size": [height, width], "counts": _uncompressed_counts(crowd)}})
                ann_id += 1
            file_name = f"{image_id:012d}.jpg"
            picture.save(root / split / file_name, quality=95)
            images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        data = {"images": images, "annotations": annotations, "categories": [PERSON_CATEGORY]}
        (root / "annotations" / f"person_keypoints_{split}.json").write_text(json.dumps(data))
    first = detections[0]
    x, y, w, h = first["bbox"]
    detections += [
        {"image_id": first["image_id"], "category_id": 1, "score": 0.5, "bbox": [x + 0.05 * w, y, w, h]},
        {"image_id": first["image_id"], "category_id": 2, "score": 0.99, "bbox": [1.0, 1.0, 20.0, 20.0]},
        {"image_id": first["image_id"], "category_id": 1, "score": 0.06, "bbox": [width - 30.0, 2.0, 25.0, 40.0]},
    ]
    path = root / DETECTIONS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(detections))
    return root

