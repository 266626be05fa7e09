"""LightningModules, one per task, plus the optimisation and run-artefact helpers they share."""

from .classification import ClassificationTask

__all__ = ["ClassificationTask"]
