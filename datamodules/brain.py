"""A real-data demo without downloads: brain tissue segmentation on the MNI152 template shipped by nilearn.

The PyPI package ``nilearn`` ships, in ``nilearn/datasets/data/``, the ICBM 2009a symmetric MNI152
template at 1 mm (197 x 233 x 189 voxels): a T1-weighted image and grey- and white-matter probability maps
(``mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``, uint8 0-255). No CSF map ships, so the
classes are background (everything else: CSF, skull, scalp, air), grey matter and white matter; each voxel
takes the largest of ``255 - gm - wm`` (clipped at 0), ``gm`` and ``wm``.

Axial slices (T1 scaled to [0, 1]) are the samples. The slices that hold tissue are cut into slabs of
``slab`` consecutive slices (the last one takes the remainder); slab k goes to training when k mod 4 is 0
or 2, to validation when 1 and to testing when 3, so evaluation never sees a slice that training saw, only
its neighbours' anatomy. Every
validation/test slab is one case (a small volume); spacing comes from the NIfTI header, so HD95 is in mm.
Read with nibabel: ``pip install nilearn nibabel``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .readers import naming_the_file
from .synapse import MedicalSliceDataModule

BRAIN_CLASSES = ("grey_matter", "white_matter")
TEMPLATE_FILES = {"t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                  "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
                  "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"}


def nilearn_data_dir() -> Path:
    """``nilearn/datasets/data`` of the installed nilearn package (found without importing it)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the brain demo reads the MNI152 template shipped with nilearn: pip install nilearn nibabel")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


def load_mni152(data_dir: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """T1 in [0, 1] and tissue labels, both ``(z, y, x)`` with anterior at the top, and the spacing ``(z, y, x)``."""
    try:
        import nibabel
    except ImportError as err:
        raise ImportError("the brain demo reads NIfTI files with nibabel: pip install nibabel") from err
    volumes, zooms = {}, None
    for key, name in TEMPLATE_FILES.items():
        path = data_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"MNI152 template file missing: {path} (shipped in nilearn's datasets/data)")
        with naming_the_file(path, "NIfTI file"):
            image = nibabel.load(path)
            volumes[key] = np.asarray(image.dataobj, dtype=np.float32)
        zooms = image.header.get_zooms()[:3]
        if volumes[key].shape != volumes["t1"].shape:
            raise ValueError(f"{path} is {volumes[key].shape}, the T1 template {volumes['t1'].shape}")
    background = np.clip(255.0 - volumes["gm"] - volumes["wm"], 0, None)
    label = np.argmax(np.stack([background, volumes["gm"], volumes["wm"]]), axis=0)
    t1 = volumes["t1"] / max(float(volumes["t1"].max()), 1.0)

    def axial(volume: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(volume.transpose(2, 1, 0)[:, ::-1, :])

    return axial(t1), axial(label).astype(np.int64), (float(zooms[2]), float(zooms[1]), float(zooms[0]))


class BrainTissueDataModule(MedicalSliceDataModule):
    """Background / grey matter / white matter on axial slices of nilearn's MNI152 template.

    Args:
        data_dir: folder holding the template files; default nilearn's ``datasets/data``.
        batch_size: training slices per batch.
        num_workers: data-loading worker processes.
        img_size: network input size (slices are 233 x 197).
        mean, std: normalisation of the [0, 1] T1 after the zoom.
        in_chans: grey slices are repeated to this many channels.
        augment: TransUNet's random rotation/flip for training.
        slab: slices per slab (the unit of the train/val/test split and of an evaluation case).
        train_repeats: each training slice appears this many times per epoch (with different augmentation).
        pin_memory: page-locked batches.
        seed: seed of the training order and augmentation.
    """

    num_classes = len(BRAIN_CLASSES) + 1
    class_names = BRAIN_CLASSES

    def __init__(self, data_dir: Optional[str] = None, batch_size: int = 8, num_workers: int = 0,
                 img_size: Union[int, Sequence[int]] = 96, mean: float = 0.5, std: float = 0.5, in_chans: int = 1,
                 augment: bool = True, slab: int = 8, train_repeats: int = 1, pin_memory: bool = False,
                 seed: int = 0) -> None:
        super().__init__(batch_size, num_workers, img_size, mean, std, in_chans, augment, pin_memory, seed)
        folder = Path(data_dir).expanduser() if data_dir else nilearn_data_dir()
        self.volume, self.label, self.spacing = load_mni152(folder)
        tissue = np.flatnonzero((self.label > 0).any(axis=(1, 2)))
        first, last = int(tissue[0]), int(tissue[-1]) + 1
        starts = list(range(first, last - slab + 1, slab)) or [first]
        slabs = [(start, start + slab) for start in starts[:-1]] + [(starts[-1], last)]
        roles = [index % 4 for index in range(len(slabs))]
        train = [z for (start, stop), role in zip(slabs, roles) if role in (0, 2) for z in range(start, stop)]
        self.items = {"train": train * max(1, train_repeats),
                      "val": [s for s, role in zip(slabs, roles) if role == 1],
                      "test": [s for s, role in zip(slabs, roles) if role == 3]}

    def load_slice(self, z: int) -> tuple[np.ndarray, np.ndarray]:
        return self.volume[z], self.label[z]

    def load_case(self, slab: tuple[int, int]) -> dict:
        start, stop = slab
        return {"image": self.volume[start:stop], "label": self.label[start:stop],
                "case": f"z{start:03d}-{stop - 1:03d}", "spacing": self.spacing}
