"""Reading the files a dataset is made of (images, ``.npz`` archives, HDF5 volumes) with one error policy.

Whatever a decoder raises on a user's file (PIL alone raises ``OSError``, ``SyntaxError``, ``ValueError``,
``EOFError`` or ``DecompressionBombError`` depending on the format and the damage) becomes an ``OSError`` that
names the file, chained to the decoder's own error. Errors about the file's content (a missing array, a wrong
image mode) are raised by the caller after decoding, with their own type.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
from PIL import Image

PathLike = Union[str, Path]


@contextmanager
def naming_the_file(path: PathLike, what: str = "file") -> Iterator[None]:
    """Turn any exception raised while decoding ``path`` into ``OSError("cannot read <what> <path>: ...")``."""
    try:
        yield
    except Exception as err:  # every decoder failure on a user's file, of whatever type, names that file
        raise OSError(f"cannot read {what} {path}: {err}") from err


def open_image(path: PathLike, mode: Optional[str] = None) -> Image.Image:
    """An image file decoded into memory, converted to ``mode`` (``RGB``, ``L``, ...) or kept as stored."""
    with naming_the_file(path, "image"), Image.open(path) as image:
        return image.convert(mode) if mode else image.copy()


def read_image(path: PathLike, mode: Optional[str] = None) -> np.ndarray:
    """An image file as an array: ``(H, W, 3)`` for ``RGB``, ``(H, W)`` for single-channel modes."""
    return np.asarray(open_image(path, mode))


def read_npz(path: Path, keys: Sequence[str], optional: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The arrays ``keys`` (and ``optional`` ones, when present) of an ``.npz`` file (no pickles)."""
    with naming_the_file(path), np.load(path, allow_pickle=False) as data:
        present = set(data.files)
        arrays = {key: np.asarray(data[key]) for key in (*keys, *optional) if key in present}
    missing = [key for key in keys if key not in present]
    if missing:
        raise KeyError(f"{path} has arrays {sorted(present)}, expected {list(keys)}")
    return arrays


def read_h5(path: Path, keys: Sequence[str], optional: Sequence[str] = ()) -> dict[str, Any]:
    """Datasets ``keys`` (and ``optional`` datasets or attributes, when present) of an HDF5 file."""
    try:
        import h5py
    except ImportError as err:
        raise ImportError("reading .h5 volumes needs h5py: pip install 'mambalab[medical]'") from err
    with naming_the_file(path), h5py.File(path, "r") as data:
        present = sorted(data.keys())
        arrays: dict[str, Any] = {key: np.asarray(data[key][()]) for key in keys if key in data}
        for key in optional:
            if key in data:
                arrays[key] = np.asarray(data[key][()])
            elif key in data.attrs:
                arrays[key] = np.asarray(data.attrs[key])
    missing = [key for key in keys if key not in arrays]
    if missing:
        raise KeyError(f"{path} has datasets {present}, expected {list(keys)}")
    return arrays
