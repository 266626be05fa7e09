"""ImageNet-layout image folders (``train/<class>/*.JPEG``, ``val/<class>/*.JPEG``) with timm's transforms."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable, Optional

import lightning.pytorch as pl
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from .evaluation import evaluation_loader
from .readers import open_image
from .resumable import ResumableTrainData


class ImageFolderDataModule(ResumableTrainData, pl.LightningDataModule):
    """Classification from class-per-folder images, as ImageNet is distributed.

    Training uses timm's ``create_transform`` (random resized crop, flip, RandAugment, colour jitter,
    random erasing); evaluation resizes and centre-crops with ``crop_pct``. Mixup/CutMix, when on,
    is exposed as ``batch_transform`` for the task to apply to training batches. The test split is
    ``test/`` when it exists, else ``val/`` (ImageNet's test labels are not public). The training
    order resumes exactly from mid-epoch checkpoints; timm's random augmentations are not replayed.

    Args:
        root: folder holding ``train/`` and ``val/`` (and optionally ``test/``).
        image_size: training crop and evaluation size.
        batch_size: images per batch.
        num_workers: data-loading worker processes.
        crop_pct: evaluation centre-crop fraction.
        auto_augment: timm RandAugment policy string, or None.
        color_jitter: colour-jitter strength.
        re_prob: random-erasing probability.
        mixup_alpha, cutmix_alpha: Mixup / CutMix strengths (0 disables).
        mixup_prob, switch_prob: probability of mixing a batch, and of CutMix instead of Mixup.
        label_smoothing: label smoothing folded into the mixed targets.
        mean, std: normalisation.
        seed: seed of the training order.
    """

    in_chans = 3

    def __init__(self, root: str, image_size: int = 224, batch_size: int = 64, num_workers: int = 4,
                 crop_pct: float = 0.875, auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1",
                 color_jitter: float = 0.4, re_prob: float = 0.25, mixup_alpha: float = 0.0,
                 cutmix_alpha: float = 0.0, mixup_prob: float = 1.0, switch_prob: float = 0.5,
                 label_smoothing: float = 0.0, mean: tuple = IMAGENET_DEFAULT_MEAN,
                 std: tuple = IMAGENET_DEFAULT_STD, seed: int = 0) -> None:
        super().__init__()
        self.root = Path(root).expanduser()
        self.seed = seed
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_transform = create_transform(image_size, is_training=True, auto_augment=auto_augment,
                                                color_jitter=color_jitter, re_prob=re_prob,
                                                interpolation="bicubic", mean=mean, std=std)
        self.eval_transform = create_transform(image_size, is_training=False, crop_pct=crop_pct,
                                               interpolation="bicubic", mean=mean, std=std)
        self.mixup = dict(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=mixup_prob,
                          switch_prob=switch_prob, label_smoothing=label_smoothing)
        self.class_names = self._classes(self._split_dir("train"))
        self.num_classes = len(self.class_names)
        self.datasets: dict[str, ImageFolder] = {}

    def _split_dir(self, split: str) -> Path:
        path = self.root / split
        if not path.is_dir():
            raise FileNotFoundError(f"image folder split not found: {path} (expected {self.root}/{split}/<class>/*)")
        return path

    @staticmethod
    def _classes(split_dir: Path) -> list[str]:
        classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
        if not classes:
            raise FileNotFoundError(f"{split_dir} has no class folders")
        return classes

    @property
    def batch_transform(self) -> Optional[Callable]:
        """Mixup/CutMix on a training batch ``(images, targets) -> (images, soft_targets)``, or None."""
        if not (self.mixup["mixup_alpha"] or self.mixup["cutmix_alpha"]):
            return None
        return Mixup(**self.mixup, num_classes=self.num_classes)

    def setup(self, stage: Optional[str] = None) -> None:
        test_split = "test" if (self.root / "test").is_dir() else "val"
        for split, transform in (("train", self.train_transform), ("val", self.eval_transform),
                                 ("test", self.eval_transform)):
            directory = self._split_dir(test_split if split == "test" else split)
            classes = self._classes(directory)
            if classes != self.class_names:
                differing = sorted(set(classes) ^ set(self.class_names))
                raise ValueError(f"{directory} classes differ from {self.root / 'train'}: {', '.join(differing)}")
            self.datasets[split] = ImageFolder(str(directory), transform=transform,
                                               loader=partial(open_image, mode="RGB"))

    def _loader(self, split: str) -> DataLoader:
        return evaluation_loader(self.datasets[split], self.batch_size, num_workers=self.num_workers,
                                 persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self.resumable_loader(self.datasets["train"], keys_with_epoch=False, num_workers=self.num_workers,
                                     drop_last=self.batch_transform is not None,
                                     persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
