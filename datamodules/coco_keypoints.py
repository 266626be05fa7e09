"""COCO person keypoints in the released layout, as top-down person crops with heatmap targets.

Layout (mmpose's and HRVMamba's ``data/coco``)::

    <root>/annotations/person_keypoints_train2017.json
    <root>/annotations/person_keypoints_val2017.json
    <root>/train2017/*.jpg
    <root>/val2017/*.jpg
    <root>/person_detection_results/COCO_val2017_detections_AP_H_56_person.json   (evaluation boxes)

Training takes one crop per annotated person, as mmpose's ``CocoDataset`` in top-down mode: boxes are
clipped to the image, and crowd annotations, people without labelled keypoints and empty boxes are left
out. Evaluation takes one crop per person detection of the detections file (a COCO results list:
``image_id``, ``category_id``, ``bbox`` xywh, ``score``; other categories are ignored) or, with
``val_boxes=ground_truth``, per annotated person (score 1). Transforms and the heatmap encoding are in
``keypoint_transforms`` (mmpose 1.x semantics, the standard MSRA Gaussian targets).

Training augmentation, in mmpose's order: horizontal flip (p 0.5, left/right keypoints swapped), half-body
crop (p 0.3), random shift (p 0.3, up to 0.16 x box), scale (x0.5-1.5) and rotation (p 0.6, up to 80
degrees), each a function of (seed, epoch, index) so that resumed runs see the same crops.

Samples are dicts: ``image`` (normalised float (3, h, w)), and for training ``heatmaps`` (K, h/4, w/4) and
``weights`` (K,); for evaluation ``center``/``scale`` (the crop box, image pixels), ``score`` (box score),
``image_id`` and ``key`` (a unique instance number).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import Dataset

from .ade20k import MEAN_255, STD_255
from .coco import load_coco_json
from .keypoint_transforms import (
    apply_affine,
    box_to_center_scale,
    compose,
    crop_matrix,
    fix_aspect_ratio,
    flip_indices_from_names,
    gaussian_heatmaps,
    half_body_box,
    horizontal_flip_matrix,
    random_box_transform,
    warp_affine,
)
from .readers import read_image
from .resumable import SplitLoaders, seed_for

COCO_KEYPOINTS = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
                  "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
                  "right_knee", "left_ankle", "right_ankle")
# Per-keypoint OKS constants of COCO's keypoint evaluation (pycocotools' ``kpt_oks_sigmas``).
COCO_SIGMAS = (0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107, 0.087,
               0.087, 0.089, 0.089)
# COCO's person skeleton (1-based keypoint numbers, as in the released JSON's ``skeleton``).
COCO_SKELETON = ((16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8), (7, 9),
                 (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7))
LOWER_BODY_PARTS = ("hip", "knee", "ankle")
DETECTIONS_FILE = "person_detection_results/COCO_val2017_detections_AP_H_56_person.json"


@dataclass
class PersonInstance:
    """One person to crop: the box (xyxy, image pixels) and, for training, the labelled keypoints."""

    key: int
    image_id: int
    file_name: str
    image_size: tuple[int, int]
    box: np.ndarray
    score: float
    keypoints: Optional[np.ndarray] = None
    visible: Optional[np.ndarray] = None


def person_category(coco: Any, path: Path) -> dict:
    """The ``person`` category of a keypoints JSON, checked to carry COCO's 17 keypoints."""
    people = [c for c in coco.cats.values() if c.get("name") == "person"]
    if not people:
        raise ValueError(f"{path}: no 'person' category (is this a person_keypoints_*.json file?)")
    names = tuple(people[0].get("keypoints", COCO_KEYPOINTS))
    if names != COCO_KEYPOINTS:
        raise ValueError(f"{path}: the person category lists keypoints {list(names)}; COCO's keypoint evaluation "
                         f"needs COCO's 17 ({', '.join(COCO_KEYPOINTS)})")
    return people[0]


def annotated_people(coco: Any, path: Path, category_id: int) -> list[PersonInstance]:
    """Every usable person annotation (mmpose's top-down filters; module docstring)."""
    instances = []
    for image_id in sorted(coco.imgs):
        info = coco.imgs[image_id]
        width, height = info["width"], info["height"]
        for ann in coco.imgToAnns.get(image_id, []):
            if ann.get("category_id") != category_id or "bbox" not in ann or "keypoints" not in ann:
                continue
            values = np.asarray(ann["keypoints"], dtype=np.float32)
            if values.size != 3 * len(COCO_KEYPOINTS):
                raise ValueError(f"{path}: annotation {ann.get('id')} has {values.size} keypoint values, "
                                 f"expected {3 * len(COCO_KEYPOINTS)} (x, y, v per keypoint)")
            values = values.reshape(-1, 3)
            x, y, w, h = ann["bbox"]
            box = np.array([np.clip(x, 0, width - 1), np.clip(y, 0, height - 1),
                            np.clip(x + w, 0, width - 1), np.clip(y + h, 0, height - 1)], dtype=np.float32)
            num_keypoints = ann.get("num_keypoints", int(np.count_nonzero(values[:, :2].max(axis=1))))
            if (ann.get("iscrowd", 0) or num_keypoints == 0 or box[2] <= box[0] or box[3] <= box[1]
                    or values[:, :2].max() <= 0):
                continue
            instances.append(PersonInstance(key=int(ann["id"]), image_id=image_id, file_name=info["file_name"],
                                            image_size=(height, width), box=box, score=1.0,
                                            keypoints=values[:, :2].copy(), visible=np.minimum(1.0, values[:, 2])))
    return instances


def detected_people(path: Path, coco: Any, category_id: int, score_threshold: float = 0.0) -> list[PersonInstance]:
    """Person boxes of a detection-results file, checked entry by entry against the keypoints JSON."""
    if not path.is_file():
        raise FileNotFoundError(f"person detection file not found: {path} (or set data.val_boxes=ground_truth)")
    try:
        detections = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot parse person detection file {path}: {err}") from err
    if not isinstance(detections, list):
        raise ValueError(f"{path}: expected a list of detections (COCO results format), got {type(detections)}")
    instances = []
    for index, det in enumerate(detections):
        if not isinstance(det, dict) or not {"image_id", "category_id", "bbox", "score"} <= det.keys() \
                or len(det["bbox"]) < 4:
            raise ValueError(f"{path}: entry {index} is not a detection with image_id, category_id, bbox "
                             f"(x, y, w, h) and score: {det!r:.200}")
        if det["category_id"] != category_id or det["score"] < score_threshold:
            continue
        info = coco.imgs.get(det["image_id"])
        if info is None:
            raise ValueError(f"{path}: entry {index} names image_id {det['image_id']}, which the keypoint "
                             f"annotations do not list")
        x, y, w, h = (float(v) for v in det["bbox"][:4])
        instances.append(PersonInstance(key=index, image_id=det["image_id"], file_name=info["file_name"],
                                        image_size=(info["height"], info["width"]),
                                        box=np.array([x, y, x + w, y + h], dtype=np.float32),
                                        score=float(det["score"])))
    return instances


class TopdownPersons(Dataset):
    """Person crops of one split (module docstring), training targets included when ``train``.

    Args:
        instances: the people to crop.
        image_dir: folder of the split's images.
        json_path: the split's annotation file (for error messages).
        input_size: (height, width) of the crops.
        heatmap_stride: input pixels per heatmap pixel.
        sigma: target Gaussian sigma in heatmap pixels.
        flip_indices: mirror keypoint of each keypoint.
        upper_body: keypoints the half-body crop may keep as "upper".
        lower_body: keypoints the half-body crop may keep as "lower".
        train: augment and return targets.
        augmentation: ``random_box_transform`` options plus ``flip_prob`` and ``half_body_prob``.
        padding: box padding factor.
        mean: normalisation mean (0-255 scale).
        std: normalisation std (0-255 scale).
        seed: augmentation seed.
    """

    def __init__(self, instances: Sequence[PersonInstance], image_dir: Path, json_path: Path,
                 input_size: Sequence[int], heatmap_stride: int, sigma: float, flip_indices: Sequence[int],
                 upper_body: Sequence[int], lower_body: Sequence[int], train: bool, augmentation: dict,
                 padding: float = 1.25, mean: Sequence[float] = MEAN_255, std: Sequence[float] = STD_255,
                 seed: int = 0) -> None:
        self.instances, self.image_dir, self.json_path = list(instances), image_dir, json_path
        self.input_size, self.heatmap_stride, self.sigma = tuple(input_size), heatmap_stride, sigma
        self.flip_indices, self.upper_body, self.lower_body = list(flip_indices), list(upper_body), list(lower_body)
        self.train, self.augmentation, self.padding, self.seed = train, dict(augmentation), padding, seed
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.instances)

    def _image(self, person: PersonInstance) -> torch.Tensor:
        pixels = read_image(self.image_dir / person.file_name, "RGB")
        if pixels.shape[:2] != person.image_size:
            raise ValueError(f"{self.json_path}: image {person.file_name} is {pixels.shape[1]}x{pixels.shape[0]} "
                             f"on disk but {person.image_size[1]}x{person.image_size[0]} in the annotations")
        return torch.from_numpy(np.array(pixels)).permute(2, 0, 1)

    def _augmented_box(self, rng: np.random.Generator, person: PersonInstance, center: np.ndarray,
                       scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, np.ndarray, np.ndarray, np.ndarray]:
        """Flip, half-body and random box transform; returns center, scale, rotation, the flip map (2x3,
        identity when not flipped) and the keypoints/labels in the (possibly flipped) image."""
        options = self.augmentation
        keypoints, visible = person.keypoints.copy(), person.visible.copy()
        flip = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        if rng.random() < options["flip_prob"]:
            flip = horizontal_flip_matrix(person.image_size[1])
            center = apply_affine(center, flip).astype(np.float32)
            keypoints = apply_affine(keypoints, flip)[self.flip_indices].astype(np.float32)
            visible = visible[self.flip_indices]
        half = half_body_box(rng, keypoints, visible, self.upper_body, self.lower_body, options["half_body_prob"])
        if half is not None:
            center, scale = half
        center, scale, rotation = random_box_transform(
            rng, center, scale, options["shift_factor"], options["shift_prob"], options["scale_range"],
            options["scale_prob"], options["rotate_factor"], options["rotate_prob"])
        return center, scale, rotation, flip, keypoints, visible

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        person = self.instances[index]
        image = self._image(person)
        center, scale = box_to_center_scale(person.box, self.padding)
        height, width = self.input_size
        if not self.train:
            scale = fix_aspect_ratio(scale, width / height)
            crop = warp_affine(image, crop_matrix(center, scale, 0.0, self.input_size), self.input_size)
            return {"image": (crop - self.mean) / self.std, "center": torch.from_numpy(center),
                    "scale": torch.from_numpy(scale), "score": torch.tensor(person.score, dtype=torch.float32),
                    "image_id": person.image_id, "key": person.key}
        rng = np.random.default_rng(seed_for(self.seed, epoch, index))
        center, scale, rotation, flip, keypoints, visible = self._augmented_box(rng, person, center, scale)
        matrix = crop_matrix(center, fix_aspect_ratio(scale, width / height), rotation, self.input_size)
        crop = warp_affine(image, compose(matrix, flip), self.input_size)
        heatmap_size = (height // self.heatmap_stride, width // self.heatmap_stride)
        heatmaps, weights = gaussian_heatmaps(apply_affine(keypoints, matrix), visible, heatmap_size,
                                              self.heatmap_stride, self.sigma)
        return {"image": (crop - self.mean) / self.std, "heatmaps": torch.from_numpy(heatmaps),
                "weights": torch.from_numpy(weights)}


class COCOKeypointsDataModule(SplitLoaders, pl.LightningDataModule):
    """COCO 2017 person keypoints for top-down pose estimation (module docstring).

    The validation JSON is read at construction (it gives the keypoints, skeleton and the ground truth the
    task evaluates against, ``coco_gt``); training annotations and detections when their stage starts.
    Validation and test both use ``val2017``. ``num_classes`` is the number of keypoints (17).

    Args:
        root: folder holding ``annotations/``, the image folders and ``person_detection_results/``.
        input_size: (height, width) of the crops: (256, 192) or (384, 288) in the official recipes.
        sigma: target Gaussian sigma in heatmap pixels (2 at 256x192, 3 at 384x288).
        heatmap_stride: input pixels per heatmap pixel.
        batch_size: training crops per batch (per device).
        val_batch_size: evaluation crops per batch.
        num_workers: data-loading worker processes.
        val_boxes: ``detections`` (the detections file, as published results) or ``ground_truth``.
        detections_file: detection results, relative to ``root`` (or absolute).
        det_score_threshold: detections scoring below this are not evaluated (mmpose's default keeps all).
        box_padding: box padding factor around each person.
        flip_prob: horizontal-flip probability in training.
        half_body_prob: half-body crop probability in training.
        shift_factor: random center shift, in box sizes.
        shift_prob: probability of the shift.
        scale_range: random box rescaling range.
        scale_prob: probability of the rescaling.
        rotate_factor: random rotation, in degrees.
        rotate_prob: probability of the rotation.
        train_split: training image folder (and ``person_keypoints_<split>.json``).
        val_split: evaluation image folder (and JSON).
        pin_memory: page-locked batches for faster host-to-GPU copies.
        seed: seed of the training order and augmentation.
    """

    in_chans = 3
    mean, std = MEAN_255, STD_255

    def __init__(self, root: str, input_size: Sequence[int] = (256, 192), sigma: float = 2.0,
                 heatmap_stride: int = 4, batch_size: int = 32, val_batch_size: int = 32, num_workers: int = 4,
                 val_boxes: str = "detections", detections_file: str = DETECTIONS_FILE,
                 det_score_threshold: float = 0.0, box_padding: float = 1.25, flip_prob: float = 0.5,
                 half_body_prob: float = 0.3, shift_factor: float = 0.16, shift_prob: float = 0.3,
                 scale_range: Sequence[float] = (0.5, 1.5), scale_prob: float = 1.0, rotate_factor: float = 80.0,
                 rotate_prob: float = 0.6, train_split: str = "train2017", val_split: str = "val2017",
                 pin_memory: bool = False, seed: int = 0) -> None:
        super().__init__()
        if val_boxes not in ("detections", "ground_truth"):
            raise ValueError(f"COCOKeypointsDataModule: val_boxes must be 'detections' or 'ground_truth', "
                             f"got {val_boxes!r}")
        self.input_size = tuple(int(s) for s in input_size)
        if len(self.input_size) != 2 or any(s % heatmap_stride for s in self.input_size):
            raise ValueError(f"COCOKeypointsDataModule: input_size {list(input_size)} must be (height, width), "
                             f"both multiples of heatmap_stride={heatmap_stride}")
        self.root = Path(root).expanduser()
        self.sigma, self.heatmap_stride, self.box_padding = sigma, heatmap_stride, box_padding
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.num_workers, self.pin_memory, self.seed = num_workers, pin_memory, seed
        self.val_boxes, self.det_score_threshold = val_boxes, det_score_threshold
        self.detections_path = self.root / detections_file
        self.splits = {"train": train_split, "val": val_split}
        self.augmentation = dict(flip_prob=flip_prob, half_body_prob=half_body_prob, shift_factor=shift_factor,
                                 shift_prob=shift_prob, scale_range=tuple(scale_range), scale_prob=scale_prob,
                                 rotate_factor=rotate_factor, rotate_prob=rotate_prob)
        for split in self.splits.values():
            if not (self.root / split).is_dir():
                raise FileNotFoundError(f"COCO image folder not found: {self.root / split} (expected "
                                        f"{self.root}/{{annotations,{train_split},{val_split}}})")
        if not self.json_path("train").is_file():
            raise FileNotFoundError(f"COCO keypoint annotation file not found: {self.json_path('train')}")
        if val_boxes == "detections" and not self.detections_path.is_file():
            raise FileNotFoundError(f"person detection file not found: {self.detections_path} (set "
                                    f"data.detections_file, or data.val_boxes=ground_truth to crop annotated boxes)")
        self.coco_gt = load_coco_json(self.json_path("val"))
        person = person_category(self.coco_gt, self.json_path("val"))
        self.person_id = person["id"]
        self.keypoint_names = list(COCO_KEYPOINTS)
        self.num_classes = len(self.keypoint_names)
        self.sigmas = list(COCO_SIGMAS)
        self.flip_indices = flip_indices_from_names(self.keypoint_names)
        self.skeleton = [(a - 1, b - 1) for a, b in person.get("skeleton", COCO_SKELETON)]
        self.lower_body = [i for i, name in enumerate(self.keypoint_names)
                           if any(part in name for part in LOWER_BODY_PARTS)]
        self.upper_body = [i for i in range(self.num_classes) if i not in self.lower_body]
        self.datasets: dict[str, TopdownPersons] = {}

    def json_path(self, stage: str) -> Path:
        """The keypoint annotation file of the ``train`` or ``val`` split."""
        return self.root / "annotations" / f"person_keypoints_{self.splits[stage]}.json"

    def image_path(self, image_id: int) -> Path:
        """Where an evaluation image (one of ``coco_gt``'s) is stored."""
        return self.root / self.splits["val"] / self.coco_gt.imgs[image_id]["file_name"]

    def _dataset(self, instances: list[PersonInstance], stage: str, train: bool) -> TopdownPersons:
        return TopdownPersons(instances, self.root / self.splits[stage], self.json_path(stage), self.input_size,
                              self.heatmap_stride, self.sigma, self.flip_indices, self.upper_body, self.lower_body,
                              train, self.augmentation, self.box_padding, self.mean, self.std, self.seed)

    def setup(self, stage: Optional[str] = None) -> None:
        if "val" not in self.datasets:
            if self.val_boxes == "detections":
                source = self.detections_path
                people = detected_people(source, self.coco_gt, self.person_id, self.det_score_threshold)
            else:
                source = self.json_path("val")
                people = annotated_people(self.coco_gt, source, self.person_id)
            if not people:
                raise ValueError(f"{source}: no person boxes to evaluate (val_boxes={self.val_boxes})")
            self.datasets["val"] = self._dataset(people, "val", train=False)
        if stage in (None, "fit") and "train" not in self.datasets:
            path = self.json_path("train")
            coco = load_coco_json(path)
            people = annotated_people(coco, path, person_category(coco, path)["id"])
            if not people:
                raise ValueError(f"{path}: no person annotation with labelled keypoints to train on")
            self.datasets["train"] = self._dataset(people, "train", train=True)
