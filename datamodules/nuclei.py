"""Nuclei segmentation demo on the real fluorescence image that ships inside the PyPI package ``stardist``.

``stardist/data/images/img2d.tif`` is a 512x512 16-bit fluorescence image of cell nuclei and ``mask2d.tif``
its instance label map (125 nuclei); here the task is binary (background / nucleus). Only the data files
are used: install with ``pip install --no-deps stardist`` (its own dependencies include TensorFlow) or point
``data_dir`` at a folder with the two files. The package is located without importing it.

Split: the left ``1 - val_fraction`` of the columns trains (random crops with flips and 90-degree
rotations, drawn per (seed, epoch, index)), the right part is cut into non-overlapping validation tiles.
Intensities are scaled by their 1st and 99.8th percentiles (as stardist does), then centred.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .ade20k import collate_dense
from .evaluation import evaluation_loader
from .readers import read_image
from .resumable import ResumableTrainData, seed_for

FILES = ("img2d.tif", "mask2d.tif")
MEAN, STD = (0.5,), (0.25,)


def package_data_dir(package: str, *parts: str) -> Optional[Path]:
    """``<package install dir>/<parts>`` when the package is installed, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)


def locate_nuclei(data_dir: Optional[str]) -> Path:
    """The folder holding ``img2d.tif`` and ``mask2d.tif``: ``data_dir`` if given, else stardist's data."""
    folder = Path(data_dir).expanduser() if data_dir else package_data_dir("stardist", "data", "images")
    if folder is None or not all((folder / name).is_file() for name in FILES):
        where = f"{folder}" if folder else "no stardist package"
        raise FileNotFoundError(f"nuclei demo data not found ({where}): install the data with "
                                f"`pip install --no-deps stardist`, or set data.data_dir to a folder with {FILES}")
    return folder


class NucleiCrops(Dataset):
    """Random training crops (``train=True``; ``length`` per epoch) or fixed tiles of one image/mask pair."""

    def __init__(self, image: Tensor, mask: Tensor, crop_size: int, train: bool, length: int, seed: int = 0) -> None:
        self.image, self.mask, self.crop_size, self.train, self.seed = image, mask, crop_size, train, seed
        height, width = mask.shape
        self.tiles = [(y, x) for y in range(0, height - crop_size + 1, crop_size)
                      for x in range(0, width - crop_size + 1, crop_size)]
        self.length = length if train else len(self.tiles)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        size = self.crop_size
        if not self.train:
            y, x = self.tiles[index]
            return {"image": self.image[:, y:y + size, x:x + size], "mask": self.mask[y:y + size, x:x + size]}
        rng = np.random.default_rng(seed_for(self.seed, epoch, index))
        height, width = self.mask.shape
        y, x = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
        image, mask = self.image[:, y:y + size, x:x + size], self.mask[y:y + size, x:x + size]
        turns = int(rng.integers(4))
        image, mask = image.rot90(turns, (-2, -1)), mask.rot90(turns, (-2, -1))
        if rng.random() < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        return {"image": image.contiguous(), "mask": mask.contiguous()}


class NucleiDataModule(ResumableTrainData, pl.LightningDataModule):
    """Binary nuclei segmentation from stardist's bundled 2-D image (a real, offline demo).

    Args:
        data_dir: folder with ``img2d.tif`` and ``mask2d.tif``; None finds the installed stardist package.
        crop_size: side of the training crops and validation tiles.
        samples_per_epoch: random training crops per epoch.
        val_fraction: right-hand share of the columns held out for validation.
        batch_size: training crops per batch.
        num_workers: data-loading worker processes.
        seed: seed of the training order and crops.
    """

    in_chans = 1
    num_classes = 2
    class_names = ("background", "nucleus")
    ignore_index = 255
    mean, std = MEAN, STD

    def __init__(self, data_dir: Optional[str] = None, crop_size: int = 128, samples_per_epoch: int = 256,
                 val_fraction: float = 0.25, batch_size: int = 8, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.folder = locate_nuclei(data_dir)
        self.crop_size, self.samples_per_epoch, self.val_fraction = crop_size, samples_per_epoch, val_fraction
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.datasets: dict[str, NucleiCrops] = {}

    def setup(self, stage: Optional[str] = None) -> None:
        if self.datasets:
            return
        image = read_image(self.folder / FILES[0]).astype(np.float32)
        labels = read_image(self.folder / FILES[1])
        if image.shape != labels.shape:
            raise ValueError(f"{self.folder / FILES[1]} is {labels.shape} but {self.folder / FILES[0]} "
                             f"is {image.shape}")
        low, high = np.percentile(image, (1.0, 99.8))
        scaled = ((image - low) / max(high - low, 1e-6)).astype(np.float32)
        image_t = (torch.from_numpy(scaled)[None] - MEAN[0]) / STD[0]
        mask_t = torch.from_numpy((labels > 0).astype(np.int64))
        split = int(round(image.shape[1] * (1 - self.val_fraction)))
        if min(split, image.shape[1] - split, image.shape[0]) < self.crop_size:
            raise ValueError(f"crop_size={self.crop_size} does not fit the {image.shape} image split at column {split}")
        self.datasets = {
            "train": NucleiCrops(image_t[..., :split], mask_t[:, :split], self.crop_size, True,
                                 self.samples_per_epoch, self.seed),
            "val": NucleiCrops(image_t[..., split:], mask_t[:, split:], self.crop_size, False, 0)}

    def train_dataloader(self) -> DataLoader:
        return self.resumable_loader(self.datasets["train"], drop_last=True, num_workers=self.num_workers,
                                     collate_fn=collate_dense)

    def val_dataloader(self) -> DataLoader:
        return evaluation_loader(self.datasets["val"], self.batch_size, num_workers=self.num_workers,
                                 collate_fn=collate_dense)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
