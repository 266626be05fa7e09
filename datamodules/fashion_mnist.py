"""Fashion-MNIST from its released IDX files: the default, embedded demo data.

Debian ships the dataset in the package ``dataset-fashion-mnist`` (files under
``/usr/share/datasets/fashion-mnist/``), so the default experiment needs no download. The files are
decoded once into memory (47 MB) and batches are built from tensors, not PIL images.
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path
from typing import Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .checks import check_labels
from .evaluation import evaluation_loader
from .resumable import ResumableTrainData, seed_for

log = logging.getLogger("mambalab")

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Decode one (optionally gzipped) IDX file, checking its magic number and size."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise ValueError(f"{path}: cannot read IDX file ({err})") from err
    if len(raw) < 8 or int.from_bytes(raw[:4], "big") != magic:
        found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise ValueError(f"{path}: not an IDX file with magic {magic} (found {found})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = offset + int(np.prod(dims))
    if len(raw) != expected:
        raise ValueError(f"{path}: truncated or padded IDX file ({len(raw)} bytes, header says {expected})")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _find(directory: Path, stem: str) -> Optional[Path]:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def locate_files(data_dir: Path, search_system: bool = True) -> Optional[dict[str, tuple[Path, Path]]]:
    """Where the four IDX files are: ``data_dir``, torchvision's ``FashionMNIST/raw`` under it, or Debian's."""
    candidates = [data_dir, data_dir / "FashionMNIST" / "raw"] + ([DEBIAN_DIR] if search_system else [])
    for directory in candidates:
        found = {split: tuple(_find(directory, stem) for stem in stems) for split, stems in SPLIT_FILES.items()}
        if all(path is not None for pair in found.values() for path in pair):
            return found
    return None


def download_with_torchvision(data_dir: Path) -> Optional[dict[str, tuple[Path, Path]]]:
    """Last resort on machines without the Debian package: torchvision's downloader into ``data_dir``."""
    from torchvision.datasets import FashionMNIST

    try:
        FashionMNIST(str(data_dir), download=True)
    except (OSError, RuntimeError):
        return None
    return locate_files(data_dir, search_system=False)


class TensorImageDataset(Dataset):
    """uint8 (N, H, W) images and int labels as normalised float (1, size, size) tensors.

    Keys are indices or ``(epoch, index)`` pairs from ``EpochShuffleSampler``; augmentation draws
    from a generator seeded by (seed, epoch, index), so a resumed run sees the same pixels.
    """

    def __init__(self, images: Tensor, labels: Tensor, mean: float, std: float, image_size: int,
                 augment: bool, seed: int = 0) -> None:
        self.images, self.labels = images, labels
        self.mean, self.std, self.image_size, self.augment, self.seed = mean, std, image_size, augment, seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> tuple[Tensor, int]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image = self.images[index].float().div_(255).unsqueeze(0)
        if self.augment:
            generator = torch.Generator().manual_seed(seed_for(self.seed, epoch, index))
            top, left = torch.randint(0, 5, (2,), generator=generator).tolist()
            image = F.pad(image, (2, 2, 2, 2))[:, top: top + 28, left: left + 28]
            if torch.rand((), generator=generator) < 0.5:
                image = image.flip(-1)
        if self.image_size != image.shape[-1]:
            image = F.interpolate(image[None], size=self.image_size, mode="bilinear", align_corners=False)[0]
        return (image - self.mean) / self.std, int(self.labels[index])


class FashionMNISTDataModule(ResumableTrainData, pl.LightningDataModule):
    """Fashion-MNIST (10 classes, 28x28 grey): 55 000 train / 5 000 validation / 10 000 test.

    Args:
        data_dir: directory searched first for the four IDX files (``*.gz`` or uncompressed, also
            torchvision's ``FashionMNIST/raw`` layout); then Debian's location; then torchvision downloads.
        batch_size: images per batch.
        num_workers: data-loading worker processes.
        image_size: side length the images are resized to (28 keeps them as they are).
        val_size: images held out of the training set for validation (fixed split).
        augment: random 2-pixel shifts and horizontal flips for training.
        search_system: also look in Debian's ``/usr/share/datasets/fashion-mnist``.
        download: let torchvision download the files when they are found nowhere.
        seed: seed of the train/validation split.
    """

    num_classes = 10
    in_chans = 1
    batch_transform = None
    class_names = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
    mean, std = 0.2860, 0.3530

    def __init__(self, data_dir: str, batch_size: int = 128, num_workers: int = 2, image_size: int = 28,
                 val_size: int = 5000, augment: bool = True, search_system: bool = True, download: bool = True,
                 seed: int = 0) -> None:
        super().__init__()
        self.data_dir = Path(data_dir).expanduser()
        self.batch_size, self.num_workers, self.image_size = batch_size, num_workers, image_size
        self.val_size, self.augment, self.seed = val_size, augment, seed
        self.search_system, self.download = search_system, download
        self.splits: dict[str, Dataset] = {}
        self.files: Optional[dict[str, tuple[Path, Path]]] = None

    @property
    def data_source(self) -> str:
        """The four IDX files this module reads (located now if not yet), for the run log."""
        return ", ".join(str(path) for pair in self._files().values() for path in pair)

    def _files(self) -> dict[str, tuple[Path, Path]]:
        if self.files is not None:
            return self.files
        files = locate_files(self.data_dir, self.search_system)
        if files is not None and files["train"][0].parent == DEBIAN_DIR != self.data_dir.resolve():
            log.warning("Fashion-MNIST: data_dir=%s has no IDX files; using the system copy in %s instead",
                        self.data_dir, DEBIAN_DIR)
        if files is None and self.download:
            files = download_with_torchvision(self.data_dir)
        if files is None:
            raise FileNotFoundError(
                f"Fashion-MNIST not found: looked in {self.data_dir}"
                + (f" and {DEBIAN_DIR}" if self.search_system else "")
                + (" and torchvision's download failed" if self.download else "")
                + ". Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put "
                + ", ".join(f"{stem}.gz" for stems in SPLIT_FILES.values() for stem in stems)
                + f" in {self.data_dir}.")
        self.files = files
        return files

    @classmethod
    def _read(cls, images_path: Path, labels_path: Path) -> tuple[Tensor, Tensor]:
        """One split's images and labels; a label outside the 10 classes is refused here, before training."""
        images = torch.from_numpy(read_idx(images_path, IMAGES_MAGIC).copy())
        labels = read_idx(labels_path, LABELS_MAGIC).astype(np.int64)
        check_labels(labels, cls.num_classes, labels_path)
        if len(images) != len(labels):
            raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
        return images, torch.from_numpy(labels)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:
            return
        files = self._files()
        images, labels = self._read(*files["train"])
        val_size = min(self.val_size, len(labels) // 5)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        train_idx, val_idx = order[val_size:], order[:val_size]
        common = dict(mean=self.mean, std=self.std, image_size=self.image_size, seed=self.seed)
        self.splits = {
            "train": TensorImageDataset(images[train_idx], labels[train_idx], augment=self.augment, **common),
            "val": TensorImageDataset(images[val_idx], labels[val_idx], augment=False, **common),
            "test": TensorImageDataset(*self._read(*files["test"]), augment=False, **common),
        }

    def _loader(self, split: str) -> DataLoader:
        return evaluation_loader(self.splits[split], self.batch_size, num_workers=self.num_workers,
                                 persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self.resumable_loader(self.splits["train"], num_workers=self.num_workers,
                                     persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
