"""LightningDataModules reading each dataset in its released on-disk format."""

from .fashion_mnist import FashionMNISTDataModule
from .imagefolder import ImageFolderDataModule

__all__ = ["FashionMNISTDataModule", "ImageFolderDataModule"]
