"""Synapse multi-organ CT in TransUNet's preprocessed format, and the slice/volume machinery the medical
data modules share (TransUNet's augmentation, per-case evaluation batches).

Layout (TransUNet's release, used unchanged by VM-UNet and MSVM-UNet)::

    <root>/train_npz/case0005_slice000.npz      keys image (H, W) float in [0, 1], label (H, W) 0..8
    <root>/test_vol_h5/case0001.npy.h5          datasets image (D, H, W), label (D, H, W)
    <root>/lists/lists_Synapse/train.txt        one slice name per line (case0031_slice000)
    <root>/lists/lists_Synapse/test_vol.txt     one case name per line (case0008)

Without a list file every file of the folder is used. Labels: 1 aorta, 2 gallbladder, 3 left kidney,
4 right kidney, 5 liver, 6 pancreas, 7 spleen, 8 stomach. The test volumes carry no voxel spacing, so HD95
is in voxels as in the papers, unless a volume holds a ``spacing`` dataset or attribute ``(z, y, x)`` or
the data module is given one. Validation uses the test volumes, as the references do (there is no
separate validation split in this release).

Training augmentation (TransUNet's ``RandomGenerator``): with probability 1/2 a random multiple of 90
degrees plus a flip along a random axis; otherwise, with probability 1/2, a rotation by a whole angle in
[-20, 20) degrees (nearest neighbour for image and label); then a zoom to ``img_size`` (cubic for the image,
nearest for the label, ``scipy.ndimage.zoom``). Augmentation is seeded by (seed, epoch, index).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .checks import check_labels
from .evaluation import evaluation_loader
from .readers import read_h5, read_npz
from .resumable import ResumableTrainData, seed_for

SYNAPSE_CLASSES = ("aorta", "gallbladder", "kidney_left", "kidney_right", "liver", "pancreas", "spleen", "stomach")


def ndimage_module() -> Any:
    """``scipy.ndimage`` (zoom, rotate), imported when first needed: scipy is an extra of the medical tasks."""
    try:
        from scipy import ndimage
    except ImportError as err:
        raise ImportError("the medical data pipeline needs scipy: pip install 'mambalab[medical]'") from err
    return ndimage


def list_files(folder: Path, list_file: Path, suffix: str) -> list[Path]:
    """``folder/<name><suffix>`` for every name in ``list_file`` (or every ``*<suffix>`` file of ``folder``
    without a list file); missing files are counted and the first one named."""
    if not folder.is_dir():
        raise FileNotFoundError(f"folder missing: {folder}")
    if list_file.is_file():
        names = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
        paths = [folder / (name if name.endswith(suffix) else name + suffix) for name in names]
        missing = [path for path in paths if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} file(s) listed in {list_file} are missing, first: {missing[0]}")
    else:
        paths = sorted(folder.glob(f"*{suffix}"))
    if not paths:
        raise FileNotFoundError(f"no *{suffix} files in {folder} (list file {list_file} absent or empty)")
    return paths


def random_rot_flip(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rotate by a random multiple of 90 degrees, then flip along a random axis (image and label alike)."""
    k, axis = int(rng.integers(0, 4)), int(rng.integers(0, 2))
    return np.flip(np.rot90(image, k), axis=axis), np.flip(np.rot90(label, k), axis=axis)


def random_rotate(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                  max_angle: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Rotate by a whole angle in ``[-max_angle, max_angle)`` degrees, nearest neighbour, same size."""
    angle = int(rng.integers(-max_angle, max_angle))
    ndimage = ndimage_module()
    return (ndimage.rotate(image, angle, order=0, reshape=False),
            ndimage.rotate(label, angle, order=0, reshape=False))


def transunet_augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator
                      ) -> tuple[np.ndarray, np.ndarray]:
    """TransUNet's ``RandomGenerator`` before its zoom: rot90 + flip (p 1/2), else rotation (p 1/4 overall)."""
    if rng.random() > 0.5:
        return random_rot_flip(image, label, rng)
    if rng.random() > 0.5:
        return random_rotate(image, label, rng)
    return image, label


def zoom_pair(image: np.ndarray, label: np.ndarray, size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Zoom a 2-D slice to ``size``: cubic for the image, nearest for the label."""
    height, width = image.shape
    if (height, width) == tuple(size):
        return image, label
    factors = (size[0] / height, size[1] / width)
    ndimage = ndimage_module()
    return ndimage.zoom(image, factors, order=3), ndimage.zoom(label, factors, order=0)


def as_labels(label: np.ndarray, source: Union[str, Path], num_classes: int) -> np.ndarray:
    """Labels stored as floats or ints -> int64, refusing fractional values and values outside
    ``0..num_classes - 1`` (naming the source and the values)."""
    values = np.asarray(label)
    rounded = np.rint(values)
    if values.size and not np.allclose(values, rounded):
        raise ValueError(f"{source}: labels must be integers, got values in [{values.min()}, {values.max()}]")
    labels = rounded.astype(np.int64)
    check_labels(labels, num_classes, source)
    return labels


class SliceDataset(Dataset):
    """2-D training slices with TransUNet's augmentation, zoomed to ``img_size`` and normalised.

    Args:
        items: one entry per slice, passed to ``load``.
        load: ``item -> (image (H, W), label (H, W))``.
        img_size: output size (height, width).
        mean: subtracted from the image after the zoom.
        std: the image is divided by it after the mean.
        in_chans: grey slices are repeated to this many channels.
        augment: apply the random rotation/flip.
        seed: augmentation seed (with the epoch and index from ``EpochShuffleSampler`` keys).
    """

    def __init__(self, items: Sequence[Any], load: Callable[[Any], tuple[np.ndarray, np.ndarray]],
                 img_size: Sequence[int], mean: float = 0.0, std: float = 1.0, in_chans: int = 1,
                 augment: bool = True, seed: int = 0) -> None:
        self.items, self.load = list(items), load
        self.img_size, self.mean, self.std, self.in_chans = tuple(img_size), mean, std, in_chans
        self.augment, self.seed = augment, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image, label = self.load(self.items[index])
        if image.ndim != 2 or image.shape != label.shape:
            raise ValueError(f"slice {self.items[index]}: expected 2-D image and label of one shape, got "
                             f"{image.shape} and {label.shape}")
        image, label = image.astype(np.float32), label
        if self.augment:
            image, label = transunet_augment(image, label, np.random.default_rng(seed_for(self.seed, epoch, index)))
        image, label = zoom_pair(np.ascontiguousarray(image), np.ascontiguousarray(label), self.img_size)
        tensor = (torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)) - self.mean) / self.std
        return {"image": tensor[None].repeat(self.in_chans, 1, 1),
                "label": torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))}


class CaseDataset(Dataset):
    """Evaluation cases: ``load(item)`` gives a dict with ``image``, ``label``, ``case`` and ``spacing``."""

    def __init__(self, items: Sequence[Any], load: Callable[[Any], dict]) -> None:
        self.items, self.load = list(items), load

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.load(self.items[index])


def collate_cases(cases: list[dict]) -> list[dict]:
    """Evaluation cases differ in size: a batch is the list itself."""
    return cases


class MedicalSliceDataModule(ResumableTrainData, pl.LightningDataModule):
    """Shared base: 2-D training slices, per-case evaluation; subclasses fill ``self.items`` in ``__init__``.

    ``self.items`` maps ``train``/``val``/``test`` to the entries that ``load_slice`` (train) and
    ``load_case`` (val, test) read.
    """

    in_chans: int = 1
    num_classes: int
    class_names: Sequence[str]

    def __init__(self, batch_size: int, num_workers: int, img_size: Union[int, Sequence[int]], mean: float,
                 std: float, in_chans: int, augment: bool, pin_memory: bool, seed: int,
                 spacing: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        self.batch_size, self.num_workers, self.pin_memory, self.seed = batch_size, num_workers, pin_memory, seed
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.mean, self.std, self.in_chans, self.augment = (float(mean),), (float(std),), in_chans, augment
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self.items: dict[str, list] = {}
        self.datasets: dict[str, Dataset] = {}

    def load_slice(self, item: Any) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def load_case(self, item: Any) -> dict:
        raise NotImplementedError

    def setup(self, stage: Optional[str] = None) -> None:
        if self.datasets:
            return
        self.datasets["train"] = SliceDataset(self.items["train"], self.load_slice, self.img_size, self.mean[0],
                                              self.std[0], self.in_chans, self.augment, self.seed)
        for split in ("val", "test"):
            self.datasets[split] = CaseDataset(self.items[split], self.load_case)

    def train_dataloader(self) -> DataLoader:
        return self.resumable_loader(self.datasets["train"], num_workers=self.num_workers, pin_memory=self.pin_memory,
                                     drop_last=len(self.datasets["train"]) > self.batch_size,
                                     persistent_workers=self.num_workers > 0)

    def _cases_loader(self, split: str) -> DataLoader:
        return evaluation_loader(self.datasets[split], 1, num_workers=self.num_workers, collate_fn=collate_cases)

    def val_dataloader(self) -> DataLoader:
        return self._cases_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._cases_loader("test")


class SynapseDataModule(MedicalSliceDataModule):
    """Synapse multi-organ CT (8 organs), TransUNet's preprocessed release (see the module docstring).

    Args:
        root: the folder holding ``train_npz``, ``test_vol_h5`` and ``lists``.
        batch_size: training slices per batch (the references: 32).
        num_workers: data-loading worker processes.
        img_size: network input size; training slices and every test slice are zoomed to it (224).
        mean, std: image normalisation after the zoom (VM-UNet: none, 0/1; MSVM-UNet: 0.5/0.5).
        in_chans: grey slices are repeated to this many channels (3, as the references feed ImageNet
            encoders; 1 gives the same function with a summed-weight stem).
        augment: TransUNet's random rotation/flip for training.
        list_dir: folder of ``train.txt``/``test_vol.txt``; default ``<root>/lists/lists_Synapse``.
        train_dir, test_dir: folder names of the slices and volumes.
        spacing: voxel spacing ``(z, y, x)`` in mm for volumes without their own, for HD95 in mm.
        pin_memory: page-locked batches for faster host-to-GPU copies.
        seed: seed of the training order and augmentation.
    """

    num_classes = len(SYNAPSE_CLASSES) + 1
    class_names = SYNAPSE_CLASSES

    def __init__(self, root: str, batch_size: int = 32, num_workers: int = 4, img_size: Union[int, Sequence[int]] = 224,
                 mean: float = 0.0, std: float = 1.0, in_chans: int = 3, augment: bool = True,
                 list_dir: Optional[str] = None, train_dir: str = "train_npz", test_dir: str = "test_vol_h5",
                 spacing: Optional[Sequence[float]] = None, pin_memory: bool = False, seed: int = 0) -> None:
        super().__init__(batch_size, num_workers, img_size, mean, std, in_chans, augment, pin_memory, seed, spacing)
        root_path = Path(root).expanduser()
        if not root_path.is_dir():
            raise FileNotFoundError(f"Synapse root {root_path} not found: expected {root_path}/train_npz/*.npz, "
                                    f"{root_path}/test_vol_h5/*.npy.h5 and {root_path}/lists/lists_Synapse/*.txt")
        lists = Path(list_dir).expanduser() if list_dir else root_path / "lists" / "lists_Synapse"
        self.items["train"] = list_files(root_path / train_dir, lists / "train.txt", ".npz")
        self.items["test"] = self.items["val"] = list_files(root_path / test_dir, lists / "test_vol.txt", ".npy.h5")

    def load_slice(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        arrays = read_npz(path, ("image", "label"))
        return arrays["image"], as_labels(arrays["label"], path, self.num_classes)

    def load_case(self, path: Path) -> dict:
        arrays = read_h5(path, ("image", "label"), optional=("spacing",))
        image, label = arrays["image"], as_labels(arrays["label"], path, self.num_classes)
        if image.ndim != 3 or image.shape != label.shape:
            raise ValueError(f"{path}: expected image and label volumes (D, H, W) of one shape, got "
                             f"{image.shape} and {label.shape}")
        spacing = arrays.get("spacing")
        spacing = tuple(float(s) for s in spacing) if spacing is not None else self.spacing
        return {"image": image.astype(np.float32), "label": label, "case": path.name.split(".")[0],
                "spacing": spacing}
