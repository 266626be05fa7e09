"""Tree-crown detection demo on the real aerial images with Pascal-VOC boxes shipped in the PyPI package ``deepforest``.

``deepforest/data`` holds NEON RGB orthophotos (10 cm pixels) with hand-drawn crown boxes: ``OSBS_029``
(400x400, 61 boxes), ``SOAP_061`` (400x400, 37 boxes labelled Alive/Dead), and two Yellowstone crops
(``2019_YELL_2_528000_4978000_image_crop2``, 2299x2472, 574 boxes; ``2019_YELL_2_541000_4977000_image_crop``,
1249x1035, 279 boxes). All labels become one class, ``tree``. Only the data files are used: install with
``pip install --no-deps deepforest`` (its dependencies include rasterio and transformers) or point
``data_dir`` at a folder with the PNG + XML pairs. The package is located without importing it.

The images are tiled into ``tile_size`` squares (the last row and column aligned to the image border);
a box is kept in a tile when at least ``min_visible`` of it lies inside, clipped to the tile. Degenerate boxes
and boxes outside their image are dropped and counted, once per split (``datamodules.checks.BoxReport``). Split by
image, so no crown is seen in both: ``val_images`` (by default the 1249x1035 Yellowstone crop) validate,
the others train (flips as augmentation).
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Optional, Sequence, Union

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .checks import BoxReport
from .coco import collate_detection, crop_target, flip_target
from .evaluation import evaluation_loader
from .nuclei import package_data_dir
from .readers import read_image
from .resumable import ResumableTrainData, seed_for

IMAGES = ("OSBS_029", "SOAP_061", "2019_YELL_2_528000_4978000_image_crop2", "2019_YELL_2_541000_4977000_image_crop")
Target = dict[str, Tensor]


def read_voc_boxes(path: Path) -> Tensor:
    """Every ``<object><bndbox>`` of a Pascal-VOC XML file as float ``(N, 4)`` xyxy; bad files are named."""
    try:
        root = ElementTree.parse(path).getroot()
        boxes = [[float(obj.find(f"bndbox/{key}").text) for key in ("xmin", "ymin", "xmax", "ymax")]
                 for obj in root.iter("object")]
    except (OSError, ElementTree.ParseError, AttributeError, TypeError, ValueError) as err:
        raise ValueError(f"cannot read Pascal-VOC boxes from {path}: {err}") from err
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def tile_origins(length: int, tile: int) -> list[int]:
    """Tile starts covering ``length``: every ``tile`` pixels, the last one moved back to end at the border."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, tile))
    return starts + ([length - tile] if starts[-1] + tile < length else [])


def tile_image(image: Tensor, boxes: Tensor, tile: int, min_visible: float) -> list[tuple[Tensor, Target]]:
    """Cut an image and its boxes into tiles; boxes less than ``min_visible`` inside a tile are dropped."""
    height, width = image.shape[-2:]
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    target = {"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.int64), "area": areas,
              "iscrowd": torch.zeros(len(boxes), dtype=torch.int64), "image_id": torch.tensor(0)}
    tiles = []
    for top in tile_origins(height, tile):
        for left in tile_origins(width, tile):
            tile_h, tile_w = min(tile, height - top), min(tile, width - left)
            cropped = crop_target(target, top, left, tile_h, tile_w)
            sides = cropped["boxes"][:, 2:] - cropped["boxes"][:, :2]
            clipped = sides[:, 0] * sides[:, 1]
            keep = clipped >= min_visible * cropped["area"]
            cropped = {key: value[keep] if value.ndim else value for key, value in cropped.items()}
            cropped["area"] = clipped[keep]
            tiles.append((image[:, top:top + tile_h, left:left + tile_w], cropped))
    return tiles


def flip_target_vertical(target: Target, height: int) -> Target:
    """Mirror boxes upside down in an image ``height`` pixels high."""
    boxes = target["boxes"]
    return dict(target, boxes=torch.stack([boxes[:, 0], height - boxes[:, 3], boxes[:, 2], height - boxes[:, 1]], 1))


class TreeTiles(Dataset):
    """Tiles as (image in [0, 1], torchvision target) pairs; training ones are flipped at random."""

    def __init__(self, tiles: Sequence[tuple[Tensor, Target]], train: bool, flip_prob: float = 0.5,
                 seed: int = 0) -> None:
        self.tiles, self.train, self.flip_prob, self.seed = list(tiles), train, flip_prob, seed

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> tuple[Tensor, Target]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image, target = self.tiles[index]
        target = dict(target, image_id=torch.tensor(index))
        if self.train:
            rng = np.random.default_rng(seed_for(self.seed, epoch, index))
            if rng.random() < self.flip_prob:
                image, target = image.flip(-1), flip_target(target, image.shape[-1])
            if rng.random() < self.flip_prob:  # vertical too: aerial images have no "up"
                image, target = image.flip(-2), flip_target_vertical(target, image.shape[-2])
        return image, target


class TreeCrownsDataModule(ResumableTrainData, pl.LightningDataModule):
    """One-class tree-crown detection from deepforest's bundled NEON images (a real, offline demo).

    Args:
        data_dir: folder with ``<name>.png`` and ``<name>.xml`` for each of ``IMAGES``; None finds the
            installed deepforest package.
        tile_size: tile side in pixels.
        min_visible: share of a box that must lie inside a tile for it to count there.
        val_images: image names used for validation (the rest train).
        batch_size: training tiles per batch.
        val_batch_size: validation tiles per batch.
        num_workers: data-loading worker processes.
        flip_prob: probability of each (horizontal, vertical) flip in training.
        seed: seed of the training order and flips.
    """

    in_chans = 3
    num_classes = 1
    class_names = ("tree",)

    def __init__(self, data_dir: Optional[str] = None, tile_size: int = 400, min_visible: float = 0.5,
                 val_images: Sequence[str] = ("2019_YELL_2_541000_4977000_image_crop",), batch_size: int = 2,
                 val_batch_size: int = 2, num_workers: int = 0, flip_prob: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        folder = Path(data_dir).expanduser() if data_dir else package_data_dir("deepforest", "data")
        missing = [name for name in IMAGES if folder is None or not (folder / f"{name}.png").is_file()
                   or not (folder / f"{name}.xml").is_file()]
        if missing:
            raise FileNotFoundError(f"tree-crown demo data not found ({folder or 'no deepforest package'}; missing "
                                    f"{missing[0]}.png/.xml): install the data with `pip install --no-deps "
                                    f"deepforest`, or set data.data_dir to a folder with the PNG + XML pairs")
        unknown = sorted(set(val_images) - set(IMAGES))
        if unknown:
            raise ValueError(f"val_images {unknown} are not among {IMAGES}")
        self.folder, self.tile_size, self.min_visible = folder, tile_size, min_visible
        self.val_images = tuple(val_images)
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size, num_workers
        self.flip_prob, self.seed = flip_prob, seed
        self.datasets: dict[str, TreeTiles] = {}

    def setup(self, stage: Optional[str] = None) -> None:
        if self.datasets:
            return
        tiles: dict[str, list] = {"train": [], "val": []}
        reports = {split: BoxReport(f"tree-crown {split} boxes in {self.folder}") for split in tiles}
        for name in IMAGES:
            image = torch.from_numpy(np.array(read_image(self.folder / f"{name}.png", "RGB")))
            image = image.permute(2, 0, 1).float() / 255
            boxes = read_voc_boxes(self.folder / f"{name}.xml")
            split = "val" if name in self.val_images else "train"
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)
            keep = reports[split].keep(xywh.numpy(), *image.shape[-2:])
            tiles[split] += tile_image(image, boxes[torch.from_numpy(keep)], self.tile_size, self.min_visible)
        for report in reports.values():
            report.report()
        self.datasets = {"train": TreeTiles(tiles["train"], True, self.flip_prob, self.seed),
                         "val": TreeTiles(tiles["val"], False)}

    def train_dataloader(self) -> DataLoader:
        return self.resumable_loader(self.datasets["train"], num_workers=self.num_workers,
                                     collate_fn=collate_detection)

    def val_dataloader(self) -> DataLoader:
        return evaluation_loader(self.datasets["val"], self.val_batch_size, num_workers=self.num_workers,
                                 collate_fn=collate_detection)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
