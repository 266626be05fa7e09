"""What every task shares: a backbone and a head, optimiser and scheduler factories from config, the weight
decay, optional ``torch.compile``, the list of facts it is told about its data, and one hook for the end of a
validation or test epoch."""

from __future__ import annotations

from typing import Callable, ClassVar, Optional

import lightning.pytorch as pl
import torch
from torch import nn

from .optim import param_groups_weight_decay


class BackboneHeadTask(pl.LightningModule):
    """Base LightningModule for ``head(backbone(x))`` tasks.

    Subclasses call ``save_hyperparameters`` themselves (Lightning records the caller's arguments),
    implement the steps, and put dataset-level metrics in ``evaluation_epoch_end(stage)``. What a task
    needs to know about its data (classes, class names, normalisation, input size) are constructor
    arguments named in ``data_inputs``; run.py fills them from the data module's attributes of the same
    names, so no task reads the data module during training.

    Args:
        backbone: the feature extractor.
        head: the task head on the backbone's output.
        optimizer: partial optimiser, called with parameter groups.
        scheduler: optional partial ``(optimizer, total_steps) -> LRScheduler``, stepped per batch.
        weight_decay: weight decay of the decayed parameter group; norms, biases, A_logs, Ds and the
            backbone's ``no_weight_decay()`` names get none.
    """

    data_inputs: ClassVar[tuple[str, ...]] = ("num_classes",)

    def __init__(self, backbone: nn.Module, head: nn.Module, optimizer: Callable,
                 scheduler: Optional[Callable] = None, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.weight_decay = weight_decay

    def setup(self, stage: str) -> None:
        if self.hparams.get("compile") and stage == "fit":
            self.backbone = torch.compile(self.backbone)

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """Optimiser parameter groups; a group may carry ``lr_scale`` (layer-wise decay)."""
        return param_groups_weight_decay([self.backbone, self.head], weight_decay)

    def configure_optimizers(self) -> dict:
        optimizer = self.optimizer_factory(params=self.parameter_groups(self.weight_decay))
        for group in optimizer.param_groups:
            group["lr"] *= group.get("lr_scale", 1.0)
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def evaluation_epoch_end(self, stage: str) -> None:
        """Compute and log dataset-level metrics of ``stage`` ("val" or "test")."""

    def on_validation_epoch_end(self) -> None:
        self.evaluation_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self.evaluation_epoch_end("test")
