"""ACDC cardiac MRI in MT-UNet's preprocessed format (as MSVM-UNet reads it).

Layout::

    <root>/train/case_001_sliceED_0.npz       keys img (H, W), label (H, W) with 0..3
    <root>/valid/case_019_sliceED_0.npz       (2-D slices)
    <root>/test/case_002_volume_ED.npz        keys img (D, H, W), label (D, H, W)
    <root>/lists/lists_ACDC/{train,valid,test}.txt   one file name per line

Without a list file every ``*.npz`` of the split folder is used. Labels: 1 right ventricle (RV),
2 myocardium (Myo), 3 left ventricle (LV). A 2-D evaluation file is a case of depth 1. The files carry no
voxel spacing, so HD95 is in voxels unless the data module is given one (or a file holds ``spacing``).
Training augmentation and zoom are TransUNet's (``datamodules.synapse``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .readers import read_npz
from .synapse import MedicalSliceDataModule, as_labels, list_files

ACDC_CLASSES = ("RV", "Myo", "LV")


class ACDCDataModule(MedicalSliceDataModule):
    """ACDC (RV, Myo, LV) in MT-UNet's npz release (see the module docstring).

    Args:
        root: the folder holding ``train``, ``valid``, ``test`` and ``lists``.
        batch_size: training slices per batch (MSVM-UNet: 32).
        num_workers: data-loading worker processes.
        img_size: network input size (224).
        mean, std: image normalisation after the zoom (MSVM-UNet: 0.5/0.5).
        in_chans: grey slices are repeated to this many channels.
        augment: TransUNet's random rotation/flip for training.
        val_split: ``valid`` (slices) or ``test`` (volumes; MSVM-UNet validates on them).
        list_dir: folder of the list files; default ``<root>/lists/lists_ACDC``.
        spacing: voxel spacing ``(z, y, x)`` in mm, for HD95 in mm.
        pin_memory: page-locked batches.
        seed: seed of the training order and augmentation.
    """

    num_classes = len(ACDC_CLASSES) + 1
    class_names = ACDC_CLASSES

    def __init__(self, root: str, batch_size: int = 32, num_workers: int = 4, img_size: Union[int, Sequence[int]] = 224,
                 mean: float = 0.5, std: float = 0.5, in_chans: int = 3, augment: bool = True,
                 val_split: str = "valid", list_dir: Optional[str] = None, spacing: Optional[Sequence[float]] = None,
                 pin_memory: bool = False, seed: int = 0) -> None:
        super().__init__(batch_size, num_workers, img_size, mean, std, in_chans, augment, pin_memory, seed, spacing)
        if val_split not in ("valid", "test"):
            raise ValueError(f"ACDC val_split must be 'valid' or 'test', got {val_split!r}")
        root_path = Path(root).expanduser()
        if not root_path.is_dir():
            raise FileNotFoundError(f"ACDC root {root_path} not found: expected {root_path}/{{train,valid,test}}/*.npz "
                                    f"and {root_path}/lists/lists_ACDC/{{train,valid,test}}.txt")
        lists = Path(list_dir).expanduser() if list_dir else root_path / "lists" / "lists_ACDC"
        splits = {split: list_files(root_path / split, lists / f"{split}.txt", ".npz")
                  for split in {"train", "test", val_split}}
        self.items = {"train": splits["train"], "val": splits[val_split], "test": splits["test"]}

    def load_slice(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        arrays = read_npz(path, ("img", "label"))
        return arrays["img"], as_labels(arrays["label"], path, self.num_classes)

    def load_case(self, path: Path) -> dict:
        arrays = read_npz(path, ("img", "label"), optional=("spacing",))
        image, label = arrays["img"], as_labels(arrays["label"], path, self.num_classes)
        if image.shape != label.shape or image.ndim not in (2, 3):
            raise ValueError(f"{path}: expected img and label of one shape, (H, W) or (D, H, W), got "
                             f"{image.shape} and {label.shape}")
        if image.ndim == 2:
            image, label = image[None], label[None]
        spacing = tuple(float(s) for s in arrays["spacing"]) if "spacing" in arrays else self.spacing
        return {"image": image.astype(np.float32), "label": label, "case": path.name[:-len(".npz")],
                "spacing": spacing}
