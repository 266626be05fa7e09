"""LightningModules, one per task, plus the optimisation and run-artefact helpers they share."""

from .base import BackboneHeadTask
from .classification import ClassificationTask

__all__ = ["BackboneHeadTask", "ClassificationTask"]
