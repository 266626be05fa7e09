"""LightningModules, one per task, plus the optimisation and run-artefact helpers they share."""

from .base import BackboneHeadTask
from .classification import ClassificationTask
from .detection import DetectionTask
from .medseg import MedicalSegmentationTask
from .pose import PoseTask
from .segmentation import SegmentationTask

__all__ = ["BackboneHeadTask", "ClassificationTask", "DetectionTask", "MedicalSegmentationTask", "PoseTask",
           "SegmentationTask"]
