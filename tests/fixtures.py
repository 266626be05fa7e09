"""Small datasets written in their real on-disk formats."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image


def write_idx(path: Path, array: np.ndarray, magic: int) -> Path:
    """Write a uint8 array as a gzipped IDX file (big-endian header: magic, then each dimension)."""
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))
    return path


def make_fashion_mnist(directory: Path, n_train: int = 96, n_test: int = 32, seed: int = 0) -> Path:
    """Fashion-MNIST's four IDX .gz files with learnable content: class k is a bright bar at row 2k+4."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(count) % 10
        images = rng.integers(0, 60, size=(count, 28, 28))
        for image, label in zip(images, labels):
            image[2 * label + 4: 2 * label + 6, 4:24] = 250
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images, 2051)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels, 2049)
    return directory


def make_imagefolder(directory: Path, classes: tuple = ("n01440764", "n01443537"), per_class: int = 4,
                     size: int = 40, splits: tuple = ("train", "val")) -> Path:
    """An ImageNet-layout tree of real JPEGs: <split>/<class>/<class>_<i>.JPEG, one colour per class."""
    rng = np.random.default_rng(0)
    for split in splits:
        for index, name in enumerate(classes):
            folder = directory / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 40, size=(size, size, 3))
                pixels[..., index % 3] += 200
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{name}_{i}.JPEG", quality=90)
    return directory
