"""LightningDataModules reading each dataset in its released on-disk format."""

from .acdc import ACDCDataModule
from .ade20k import ADE20KDataModule
from .brain import BrainTissueDataModule
from .coco import COCODataModule
from .coco_keypoints import COCOKeypointsDataModule
from .fashion_mnist import FashionMNISTDataModule
from .imagefolder import ImageFolderDataModule
from .isic import IsicDataModule
from .nuclei import NucleiDataModule
from .synapse import SynapseDataModule
from .trees import TreeCrownsDataModule

__all__ = ["ACDCDataModule", "ADE20KDataModule", "BrainTissueDataModule", "COCODataModule", "COCOKeypointsDataModule",
           "FashionMNISTDataModule", "ImageFolderDataModule", "IsicDataModule", "NucleiDataModule",
           "SynapseDataModule", "TreeCrownsDataModule"]
