"""ISIC 2017 / 2018 skin-lesion segmentation (RGB images + binary masks) with VM-UNet's pipeline.

Layout (VM-UNet's prepared folders; VM-UNet splits each challenge's training set 7:3 into train/val and
reports its results on val)::

    <root>/train/images/ISIC_0000000.jpg                 (.jpg or .png)
    <root>/train/masks/ISIC_0000000_segmentation.png     (or ISIC_0000000.png); 0 background, >127 lesion
    <root>/val/images/...   <root>/val/masks/...

Masks are paired with images by name (the image's stem, or the stem plus ``_segmentation`` as in the
challenge release). The test split is ``val`` unless ``test_split`` names another folder of the same shape.

Pipeline: each image is min-max scaled to [0, 255] (VM-UNet standardises with dataset statistics and
then min-max scales every image, which comes to the same), then for training horizontal and vertical
flips (p 1/2 each) and, with p 1/2, a rotation by an angle drawn uniformly in [0, 360) (nearest
neighbour, VM-UNet draws one angle per run, here one per sample); finally a resize to ``img_size``
(bilinear image, nearest mask; VM-UNet resizes masks bilinearly). Evaluation runs at ``img_size`` too,
as VM-UNet scores the resized masks. One sigmoid output: ``num_classes = 1``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import lightning.pytorch as pl
import numpy as np
import torch
import torchvision.transforms.functional as TF
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode

from .evaluation import evaluation_loader
from .readers import read_image
from .resumable import ResumableTrainData, seed_for
from .synapse import collate_cases

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def list_isic_pairs(split_dir: Path) -> list[tuple[Path, Path]]:
    """Every image of ``split_dir/images`` with its mask from ``split_dir/masks``; a missing mask is named."""
    image_dir, mask_dir = split_dir / "images", split_dir / "masks"
    for directory in (image_dir, mask_dir):
        if not directory.is_dir():
            raise FileNotFoundError(f"ISIC folder missing: {directory} (expected <root>/<split>/images and "
                                    f"<root>/<split>/masks)")
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}")
    masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    pairs, missing = [], []
    for image in images:
        mask = masks.get(image.stem) or masks.get(f"{image.stem}_segmentation")
        if mask is None:
            missing.append(image)
        else:
            pairs.append((image, mask))
    if missing:
        raise FileNotFoundError(f"{len(missing)} ISIC image(s) without a mask in {mask_dir} (looked for <stem>.png "
                                f"and <stem>_segmentation.png), first: {missing[0].name}")
    return pairs


def minmax_255(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` -> ``(3, H, W)`` float scaled to [0, 255] over the whole image."""
    tensor = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)
    low, high = tensor.min(), tensor.max()
    return (tensor - low) / (high - low).clamp_min(1e-6) * 255


class IsicPairs(Dataset):
    """(image, mask) pairs: training samples ``{image (3, S, S), label (S, S)}`` or evaluation cases."""

    def __init__(self, pairs: Sequence[tuple[Path, Path]], train: bool, img_size: Sequence[int], seed: int = 0) -> None:
        self.pairs, self.train, self.img_size, self.seed = list(pairs), train, list(img_size), seed

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image_path, mask_path = self.pairs[index]
        image, mask = read_image(image_path, "RGB"), read_image(mask_path, "L")
        if image.shape[:2] != mask.shape:
            raise ValueError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {image_path} is "
                             f"{image.shape[1]}x{image.shape[0]}")
        tensor, label = minmax_255(image), torch.from_numpy((mask > 127).astype(np.int64))[None]
        if self.train:
            rng = np.random.default_rng(seed_for(self.seed, epoch, index))
            if rng.random() < 0.5:
                tensor, label = TF.hflip(tensor), TF.hflip(label)
            if rng.random() < 0.5:
                tensor, label = TF.vflip(tensor), TF.vflip(label)
            if rng.random() < 0.5:
                angle = float(rng.uniform(0, 360))
                tensor, label = TF.rotate(tensor, angle), TF.rotate(label, angle)
        tensor = TF.resize(tensor, self.img_size, InterpolationMode.BILINEAR, antialias=False)
        label = TF.resize(label, self.img_size, InterpolationMode.NEAREST)[0]
        if self.train:
            return {"image": tensor, "label": label}
        return {"image": tensor[None].numpy(), "label": label[None].numpy(), "case": image_path.stem, "spacing": None}


class IsicDataModule(ResumableTrainData, pl.LightningDataModule):
    """ISIC 2017 or 2018 lesion segmentation, VM-UNet's folders and pipeline (see the module docstring).

    Args:
        root: the folder holding ``train`` and ``val`` (each with ``images`` and ``masks``).
        batch_size: training images per batch (VM-UNet: 32).
        num_workers: data-loading worker processes.
        img_size: training and evaluation size (VM-UNet: 256).
        test_split: folder of the test images (VM-UNet tests on ``val``).
        pin_memory: page-locked batches.
        seed: seed of the training order and augmentation.
    """

    in_chans = 3
    num_classes = 1
    class_names = ("lesion",)
    mean, std = (0.0,), (1.0,)

    def __init__(self, root: str, batch_size: int = 32, num_workers: int = 4, img_size: Union[int, Sequence[int]] = 256,
                 test_split: str = "val", pin_memory: bool = False, seed: int = 0) -> None:
        super().__init__()
        root_path = Path(root).expanduser()
        if not root_path.is_dir():
            raise FileNotFoundError(f"ISIC root {root_path} not found: expected {root_path}/{{train,val}}/"
                                    f"{{images,masks}}/")
        self.batch_size, self.num_workers, self.pin_memory, self.seed = batch_size, num_workers, pin_memory, seed
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.pairs = {split: list_isic_pairs(root_path / folder)
                      for split, folder in (("train", "train"), ("val", "val"), ("test", test_split))}
        self.datasets: dict[str, IsicPairs] = {}

    def setup(self, stage: Optional[str] = None) -> None:
        if not self.datasets:
            self.datasets = {split: IsicPairs(pairs, split == "train", self.img_size, self.seed)
                             for split, pairs in self.pairs.items()}

    def train_dataloader(self) -> DataLoader:
        return self.resumable_loader(self.datasets["train"], num_workers=self.num_workers, pin_memory=self.pin_memory,
                                     drop_last=len(self.datasets["train"]) > self.batch_size,
                                     persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return evaluation_loader(self.datasets["val"], 8, num_workers=self.num_workers, collate_fn=collate_cases)

    def test_dataloader(self) -> DataLoader:
        return evaluation_loader(self.datasets["test"], 8, num_workers=self.num_workers, collate_fn=collate_cases)
