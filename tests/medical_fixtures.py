"""Tiny medical datasets written in the exact on-disk formats the data modules read.

Synapse (TransUNet): ``train_npz/caseXXXX_sliceYYY.npz`` (image, label), ``test_vol_h5/caseXXXX.npy.h5``
(image, label volumes), ``lists/lists_Synapse/{train,test_vol}.txt``. ACDC (MT-UNet): ``{train,valid}``
slices and ``test`` volumes as npz with ``img``/``label``, ``lists/lists_ACDC/*.txt``. ISIC (VM-UNet's
folders): ``{train,val}/{images,masks}`` with ``<stem>.jpg`` and ``<stem>_segmentation.png``.

Organs are axis-aligned boxes drawn brighter than the background, so a model can learn them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def organ_slice(size: int, num_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A ``(size, size)`` image in [0, 1] and labels with a box per class 1..num_classes-1 (later ones on top)."""
    image = rng.uniform(0.0, 0.2, size=(size, size)).astype(np.float32)
    label = np.zeros((size, size), dtype=np.float32)
    for value in range(1, num_classes):
        height, width = rng.integers(size // 8, size // 3, size=2)
        top, left = rng.integers(0, size - height), rng.integers(0, size - width)
        label[top:top + height, left:left + width] = value
        image[top:top + height, left:left + width] = 0.2 + 0.8 * value / num_classes
    return image, label


def make_synapse(root: Path, train_cases: int = 2, slices: int = 3, test_cases: int = 2, depth: int = 3,
                 size: int = 32, seed: int = 0) -> Path:
    """A Synapse folder in TransUNet's format with 9 classes (labels stored as float32, as released)."""
    import h5py

    rng = np.random.default_rng(seed)
    (root / "train_npz").mkdir(parents=True)
    (root / "test_vol_h5").mkdir()
    lists = root / "lists" / "lists_Synapse"
    lists.mkdir(parents=True)
    names = []
    for case in range(train_cases):
        for index in range(slices):
            name = f"case{case + 5:04d}_slice{index:03d}"
            image, label = organ_slice(size, 9, rng)
            np.savez(root / "train_npz" / f"{name}.npz", image=image, label=label)
            names.append(name)
    (lists / "train.txt").write_text("\n".join(names) + "\n")
    cases = []
    for case in range(test_cases):
        name = f"case{case + 1:04d}"
        pairs = [organ_slice(size, 9, rng) for _ in range(depth)]
        with h5py.File(root / "test_vol_h5" / f"{name}.npy.h5", "w") as volume:
            volume["image"] = np.stack([image for image, _ in pairs])
            volume["label"] = np.stack([label for _, label in pairs])
        cases.append(name)
    (lists / "test_vol.txt").write_text("\n".join(cases) + "\n")
    return root


def make_acdc(root: Path, train_slices: int = 4, valid_slices: int = 2, test_cases: int = 2, depth: int = 3,
              size: int = 32, seed: int = 0) -> Path:
    """An ACDC folder in MT-UNet's npz format (img/label; 1 RV, 2 Myo, 3 LV)."""
    rng = np.random.default_rng(seed)
    lists = root / "lists" / "lists_ACDC"
    lists.mkdir(parents=True)
    for split, count in (("train", train_slices), ("valid", valid_slices)):
        (root / split).mkdir()
        names = []
        for index in range(count):
            name = f"case_{index + 1:03d}_sliceED_{index}.npz"
            image, label = organ_slice(size, 4, rng)
            np.savez(root / split / name, img=image, label=label)
            names.append(name)
        (lists / f"{split}.txt").write_text("\n".join(names) + "\n")
    (root / "test").mkdir()
    names = []
    for case in range(test_cases):
        name = f"case_{case + 2:03d}_volume_ED.npz"
        pairs = [organ_slice(size, 4, rng) for _ in range(depth)]
        np.savez(root / "test" / name, img=np.stack([i for i, _ in pairs]), label=np.stack([lab for _, lab in pairs]))
        names.append(name)
    (lists / "test.txt").write_text("\n".join(names) + "\n")
    return root


def make_isic(root: Path, train_images: int = 4, val_images: int = 2, size: int = 40, seed: int = 0) -> Path:
    """An ISIC folder as VM-UNet prepares it: RGB JPEG images, 0/255 PNG masks named ``<stem>_segmentation``."""
    rng = np.random.default_rng(seed)
    index = 0
    for split, count in (("train", train_images), ("val", val_images)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for _ in range(count):
            _, label = organ_slice(size, 2, rng)
            rgb = np.stack([rng.uniform(60, 120, (size, size))] * 3, axis=-1)
            rgb[label > 0] = (200, 120, 90)
            stem = f"ISIC_{index:07d}"
            Image.fromarray(rgb.astype(np.uint8)).save(root / split / "images" / f"{stem}.jpg", quality=95)
            mask = Image.fromarray((label > 0).astype(np.uint8) * 255)
            mask.save(root / split / "masks" / f"{stem}_segmentation.png")
            index += 1
    return root
