"""What every task shares: a backbone and a head, optimiser and scheduler factories from config, the weight
decay, optional ``torch.compile``, the list of facts it is told about its data, one hook for the end of a
validation or test epoch, and the record of which backbone and experiment wrote a checkpoint."""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Optional

import lightning.pytorch as pl
import torch
from torch import nn

from .checkpoint_io import IDENTITY_KEY
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

    ``run_identity`` (set by run.py: backbone name, experiment) is saved in every checkpoint, so a resume
    or evaluation with another backbone is refused by name before anything is loaded.
    """

    data_inputs: ClassVar[tuple[str, ...]] = ("num_classes",)

    def __init__(self, backbone: nn.Module, head: nn.Module, optimizer: Callable,
                 scheduler: Optional[Callable] = None, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.weight_decay = weight_decay
        self.run_identity: dict[str, Optional[str]] = {}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        architecture = getattr(self.backbone, "pretrained_cfg", {}).get("architecture")
        checkpoint[IDENTITY_KEY] = {"backbone": architecture, **self.run_identity}

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
        total_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps):
            raise ValueError("the learning-rate schedule needs the run's length, but trainer.max_epochs=-1 and "
                             "trainer.max_steps=-1 set none: set one of them, or scheduler=null")
        scheduler = self.scheduler_factory(optimizer, total_steps=int(total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def evaluation_epoch_end(self, stage: str) -> None:
        """Compute and log dataset-level metrics of ``stage`` ("val" or "test")."""

    def on_validation_epoch_end(self) -> None:
        self.evaluation_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self.evaluation_epoch_end("test")
