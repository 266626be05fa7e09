"""ADE20K (SceneParsing, ``ADEChallengeData2016``) in its released layout, with mmseg's UperNet pipeline.

Layout::

    <root>/ADEChallengeData2016/images/{training,validation}/ADE_*.jpg
    <root>/ADEChallengeData2016/annotations/{training,validation}/ADE_*.png   (uint8, 0 = unlabelled)

``root`` may also be the ``ADEChallengeData2016`` folder itself. Labels are "reduced": 0 becomes 255
(ignored) and every other value drops by one, giving 150 classes (mmseg's ``reduce_zero_label=True``).

Training pipeline (mmseg ``configs/_base_/datasets/ade20k.py``): random resize to a random ratio in
[0.5, 2.0] of the 2048x512 scale (keeping the aspect ratio), random 512x512 crop re-drawn up to 10 times
while one class covers 75 % or more of it, horizontal flip with probability 1/2, photometric distortion
(brightness, contrast, saturation, hue, each with probability 1/2), normalisation with ImageNet's mean and
std (x255), padding to the crop size (image 0, label 255). Evaluation resizes the image to fit 2048x512 and
keeps the label at its original size. Augmentation is a function of (seed, epoch, index), so resumed runs
see the same pixels. Images are resized with PIL (bilinear; mmseg uses OpenCV's), labels with nearest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from .checks import check_labels
from .readers import open_image, read_image
from .resumable import SplitLoaders, seed_for

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
# mmseg's SegDataPreProcessor: ImageNet statistics on the 0-255 scale, RGB order.
MEAN_255 = (123.675, 116.28, 103.53)
STD_255 = (58.395, 57.12, 57.375)
IGNORE_INDEX = 255
SPLITS = {"train": "training", "val": "validation"}


def read_label_map(path: Path) -> np.ndarray:
    """A label PNG as ``(H, W)`` uint8, naming the file when it is unreadable or not single-channel."""
    image = open_image(path)
    if image.mode not in ("L", "P"):
        raise OSError(f"cannot read annotation {path}: expected a single-channel (L or P) PNG, got mode {image.mode}")
    return np.asarray(image)


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """ADE20K's label shift: 0 (unlabelled) -> 255, k -> k - 1 (so 255 stays ignored)."""
    out = label.astype(np.int64) - 1
    out[label == 0] = IGNORE_INDEX
    out[out == 254] = IGNORE_INDEX
    return out.astype(np.uint8)


def rescale_size(height: int, width: int, scale: Sequence[int]) -> tuple[int, int]:
    """Size that fits ``scale = (long, short)`` keeping the aspect ratio (mmcv's ``rescale_size``)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_pair(image: np.ndarray, label: Optional[np.ndarray], size: tuple[int, int]
                ) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Resize an image (bilinear) and its label map (nearest) to ``size = (height, width)``."""
    if image.shape[:2] == tuple(size):
        return image, label
    pil_size = (size[1], size[0])
    image = np.asarray(Image.fromarray(image).resize(pil_size, Image.BILINEAR))
    if label is not None:
        label = np.asarray(Image.fromarray(label).resize(pil_size, Image.NEAREST))
    return image, label


def random_crop(image: np.ndarray, label: np.ndarray, crop_size: Sequence[int], rng: np.random.Generator,
                cat_max_ratio: float = 1.0, ignore_index: int = IGNORE_INDEX, attempts: int = 10
                ) -> tuple[np.ndarray, np.ndarray]:
    """mmseg's RandomCrop: a ``crop_size`` window (smaller where the image is), re-drawn up to ``attempts``
    times while it holds a single class or one class covers ``cat_max_ratio`` or more of its labelled pixels."""
    crop_h, crop_w = crop_size
    height, width = label.shape

    def draw() -> tuple[int, int]:
        return int(rng.integers(0, max(height - crop_h, 0) + 1)), int(rng.integers(0, max(width - crop_w, 0) + 1))

    top, left = draw()
    if cat_max_ratio < 1.0:
        for _ in range(attempts):
            window = label[top:top + crop_h, left:left + crop_w]
            values, counts = np.unique(window, return_counts=True)
            counts = counts[values != ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            top, left = draw()
    return image[top:top + crop_h, left:left + crop_w], label[top:top + crop_h, left:left + crop_w]


def _convert(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator, brightness_delta: float = 32,
                           contrast_range: Sequence[float] = (0.5, 1.5),
                           saturation_range: Sequence[float] = (0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on uint8 RGB: random brightness, contrast (before or after the colour
    changes, at random), saturation and hue (HSV; ``hue_delta`` in OpenCV's 180-step hue), each with p = 1/2."""
    if rng.integers(2):
        image = _convert(image, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = bool(rng.integers(2))

    def contrast(img: np.ndarray) -> np.ndarray:
        return _convert(img, alpha=rng.uniform(*contrast_range)) if rng.integers(2) else img

    if contrast_first:
        image = contrast(image)
    if rng.integers(2):
        hsv = np.array(Image.fromarray(image).convert("HSV"))
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation_range))
        image = np.asarray(Image.frombytes("HSV", hsv.shape[1::-1], hsv.tobytes()).convert("RGB"))
    if rng.integers(2):
        hsv = np.array(Image.fromarray(image).convert("HSV"))
        shift = round(int(rng.integers(-hue_delta, hue_delta + 1)) * 256 / 180)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + shift) % 256
        image = np.asarray(Image.frombytes("HSV", hsv.shape[1::-1], hsv.tobytes()).convert("RGB"))
    if not contrast_first:
        image = contrast(image)
    return image


def to_tensor(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(H, W[, C])`` uint8 -> normalised float ``(C, H, W)``."""
    tensor = torch.from_numpy(np.array(image, dtype=np.float32))
    tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    return (tensor - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


def pad_pair(image: Tensor, label: Tensor, size: Sequence[int], ignore_index: int = IGNORE_INDEX
             ) -> tuple[Tensor, Tensor]:
    """Pad the bottom/right of a normalised image (with 0) and its labels (with ``ignore_index``) to ``size``."""
    pad_h, pad_w = max(size[0] - image.shape[-2], 0), max(size[1] - image.shape[-1], 0)
    if not (pad_h or pad_w):
        return image, label
    image = torch.nn.functional.pad(image, (0, pad_w, 0, pad_h), value=0.0)
    label = torch.nn.functional.pad(label, (0, pad_w, 0, pad_h), value=ignore_index)
    return image, label


def collate_dense(samples: list[dict]) -> dict:
    """Stack each field when all samples agree in shape, else keep a list (evaluation images vary in size)."""
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [sample[key] for sample in samples]
        if isinstance(values[0], Tensor) and all(v.shape == values[0].shape for v in values):
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch


class SegmentationPairs(Dataset):
    """(image file, label file) pairs with mmseg's ADE20K training or evaluation pipeline.

    Keys are indices or ``(epoch, index)`` pairs from ``EpochShuffleSampler``; training augmentation is
    seeded by (seed, epoch, index).

    Args:
        pairs: (image path, label path) per sample.
        train: training pipeline (random resize/crop/flip/photometric) or evaluation (resize only).
        scale: (long, short) resize scale.
        ratio_range: training resize ratio range.
        crop_size: training crop (height, width).
        cat_max_ratio: largest share of one class in a training crop.
        reduce_zero: apply ``reduce_zero_label`` to the label files.
        mean: normalisation mean (0-255 scale).
        std: normalisation std (0-255 scale).
        seed: augmentation seed.
        num_classes: classes of the (reduced) labels; a label file holding another value is refused by name.
    """

    def __init__(self, pairs: Sequence[tuple[Path, Path]], train: bool, scale: Sequence[int] = (2048, 512),
                 ratio_range: Sequence[float] = (0.5, 2.0), crop_size: Sequence[int] = (512, 512),
                 cat_max_ratio: float = 0.75, reduce_zero: bool = True, mean: Sequence[float] = MEAN_255,
                 std: Sequence[float] = STD_255, seed: int = 0, num_classes: int = len(ADE20K_CLASSES)) -> None:
        self.pairs, self.train, self.num_classes = list(pairs), train, num_classes
        self.scale, self.ratio_range, self.crop_size = tuple(scale), tuple(ratio_range), tuple(crop_size)
        self.cat_max_ratio, self.reduce_zero = cat_max_ratio, reduce_zero
        self.mean, self.std, self.seed = tuple(mean), tuple(std), seed

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw image and its (reduced) label map, checked to have the same size and known labels."""
        image_path, label_path = self.pairs[index]
        image, label = read_image(image_path, "RGB"), read_label_map(label_path)
        if image.shape[:2] != label.shape:
            raise ValueError(f"annotation {label_path} is {label.shape[1]}x{label.shape[0]} but image "
                             f"{image_path} is {image.shape[1]}x{image.shape[0]}")
        if self.reduce_zero:  # the file's own values are named: 0 unlabelled, 1..K the classes
            check_labels(label, self.num_classes + 1, f"annotation {label_path}", IGNORE_INDEX,
                         f" (0 unlabelled, 1..{self.num_classes} the classes)")
            return image, reduce_zero_label(label)
        check_labels(label, self.num_classes, f"annotation {label_path}", IGNORE_INDEX)
        return image, label

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image, label = self.load(index)
        if not self.train:
            image, _ = resize_pair(image, None, rescale_size(*image.shape[:2], self.scale))
            return {"image": to_tensor(image, self.mean, self.std), "mask": torch.from_numpy(label.astype(np.int64))}
        rng = np.random.default_rng(seed_for(self.seed, epoch, index))
        ratio = rng.uniform(*self.ratio_range)
        scale = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        image, label = resize_pair(image, label, rescale_size(*image.shape[:2], scale))
        image, label = random_crop(image, label, self.crop_size, rng, self.cat_max_ratio)
        if rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        image = photometric_distortion(np.ascontiguousarray(image), rng)
        tensor, mask = pad_pair(to_tensor(image, self.mean, self.std),
                                torch.from_numpy(np.ascontiguousarray(label).astype(np.int64)), self.crop_size)
        return {"image": tensor, "mask": mask}


def find_ade_root(root: Path) -> Path:
    """The ``ADEChallengeData2016`` folder at or under ``root``; the error shows the expected layout."""
    for candidate in (root / "ADEChallengeData2016", root):
        if (candidate / "images").is_dir() and (candidate / "annotations").is_dir():
            return candidate
    raise FileNotFoundError(
        f"ADE20K not found at {root}: expected {root}/ADEChallengeData2016/images/{{training,validation}}/*.jpg "
        f"and {root}/ADEChallengeData2016/annotations/{{training,validation}}/*.png (the released "
        f"ADEChallengeData2016.zip unpacked into {root})")


def list_pairs(dataset_root: Path, split_dir: str) -> list[tuple[Path, Path]]:
    """Every ``images/<split>/*.jpg`` with its ``annotations/<split>/<stem>.png``; a missing one is named."""
    image_dir, label_dir = dataset_root / "images" / split_dir, dataset_root / "annotations" / split_dir
    for directory in (image_dir, label_dir):
        if not directory.is_dir():
            raise FileNotFoundError(f"ADE20K split folder missing: {directory}")
    images = sorted(image_dir.glob("*.jpg"))
    if not images:
        raise FileNotFoundError(f"no *.jpg images in {image_dir}")
    pairs = [(image, label_dir / f"{image.stem}.png") for image in images]
    missing = [label for _, label in pairs if not label.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} ADE20K annotation file(s) missing, first: {missing[0]}")
    return pairs


class ADE20KDataModule(SplitLoaders, pl.LightningDataModule):
    """ADE20K SceneParsing (150 classes) for semantic segmentation, mmseg's 512x512 UperNet pipeline.

    Validation and test both use the ``validation`` split (the test labels are not public), one image
    per batch by default as mmseg does, labels at full resolution.

    Args:
        root: folder holding ``ADEChallengeData2016/`` (or that folder itself).
        batch_size: training images per batch (per device).
        val_batch_size: evaluation images per batch (images of different sizes travel as lists).
        num_workers: data-loading worker processes.
        crop_size: training crop (height, width).
        scale: (long, short) resize scale for training (times a random ratio) and evaluation.
        ratio_range: training resize ratio range.
        cat_max_ratio: largest share of one class in a training crop.
        pin_memory: page-locked batches for faster host-to-GPU copies.
        seed: seed of the training order and augmentation.
    """

    in_chans = 3
    num_classes = len(ADE20K_CLASSES)
    class_names = ADE20K_CLASSES
    ignore_index = IGNORE_INDEX
    mean, std = MEAN_255, STD_255

    collate_fn = staticmethod(collate_dense)
    drop_last_train = True  # BatchNorm in the head needs more than one image per batch

    def __init__(self, root: str, batch_size: int = 16, val_batch_size: int = 1, num_workers: int = 4,
                 crop_size: Sequence[int] = (512, 512), scale: Sequence[int] = (2048, 512),
                 ratio_range: Sequence[float] = (0.5, 2.0), cat_max_ratio: float = 0.75, pin_memory: bool = False,
                 seed: int = 0) -> None:
        super().__init__()
        self.root = find_ade_root(Path(root).expanduser())
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.num_workers, self.pin_memory, self.seed = num_workers, pin_memory, seed
        self.pipeline = dict(scale=tuple(scale), ratio_range=tuple(ratio_range), crop_size=tuple(crop_size),
                             cat_max_ratio=cat_max_ratio)
        self.pairs = {split: list_pairs(self.root, directory) for split, directory in SPLITS.items()}
        self.datasets: dict[str, SegmentationPairs] = {}

    def setup(self, stage: Optional[str] = None) -> None:
        if self.datasets:
            return
        self.datasets = {split: SegmentationPairs(pairs, train=split == "train", seed=self.seed, **self.pipeline)
                         for split, pairs in self.pairs.items()}
