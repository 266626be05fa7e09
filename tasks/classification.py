"""Image classification as a LightningModule: any backbone, any head, top-1/top-5."""

from __future__ import annotations

from typing import Callable, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from .optim import param_groups_layer_decay, param_groups_weight_decay


class ClassificationTask(pl.LightningModule):
    """Cross-entropy training of ``head(backbone pooled features)``.

    Args:
        backbone: a timm-style model built with ``num_classes=0`` (pooled features from ``forward``).
        head: maps pooled features to logits.
        optimizer: partial optimiser, called with parameter groups (weight decay off for norms,
            biases, A_logs, Ds and the backbone's ``no_weight_decay()`` names).
        scheduler: optional partial ``(optimizer, total_steps) -> LRScheduler``, stepped per batch.
        num_classes: number of classes (for the metrics).
        label_smoothing: cross-entropy label smoothing (hard targets only).
        layer_decay: layer-wise learning-rate decay for fine-tuning (e.g. 0.75), or None.
        compile: wrap the backbone in ``torch.compile`` at fit time.

    When the datamodule has a ``batch_transform`` (Mixup/CutMix), it is applied to training batches
    and the loss becomes soft-target cross-entropy.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, optimizer: Callable, num_classes: int,
                 scheduler: Optional[Callable] = None, label_smoothing: float = 0.0,
                 layer_decay: Optional[float] = None, compile: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "head", "optimizer", "scheduler"], logger=False)
        self.backbone = backbone
        self.head = head
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        top_k = min(5, num_classes)
        self.metrics = nn.ModuleDict({
            f"{stage}_acc": MulticlassAccuracy(num_classes, average="micro") for stage in ("val", "test")})
        self.metrics.update({
            f"{stage}_acc_top{top_k}": MulticlassAccuracy(num_classes, top_k=top_k, average="micro")
            for stage in ("val", "test")})
        self.top_k = top_k
        self.val_acc_best = MaxMetric()
        self.train_loss = MeanMetric()

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))

    def setup(self, stage: str) -> None:
        if self.hparams.compile and stage == "fit":
            self.backbone = torch.compile(self.backbone)

    def _batch_transform(self) -> Optional[Callable]:
        datamodule = getattr(self.trainer, "datamodule", None)
        return getattr(datamodule, "batch_transform", None)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, targets = batch
        transform = self._batch_transform()
        if transform is not None:
            images, targets = transform(images, targets)
        logits = self(images)
        if targets.ndim == 2:
            loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        else:
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.hparams.label_smoothing)
        self.train_loss(loss.detach())
        self.log("train/loss", self.train_loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        images, targets = batch
        logits = self(images).float()
        self.log(f"{stage}/loss", F.cross_entropy(logits, targets), on_epoch=True, sync_dist=True, prog_bar=True)
        for name in (f"{stage}_acc", f"{stage}_acc_top{self.top_k}"):
            self.metrics[name](logits, targets)
            self.log(name.replace("_", "/", 1), self.metrics[name], on_epoch=True, prog_bar=name.endswith("_acc"))

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.val_acc_best(self.metrics["val_acc"].compute())
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> dict:
        weight_decay = getattr(self.optimizer_factory, "keywords", {}).get("weight_decay", 0.0)
        if self.hparams.layer_decay:
            groups = param_groups_layer_decay(self.backbone, self.head, weight_decay, self.hparams.layer_decay)
        else:
            groups = param_groups_weight_decay([self.backbone, self.head], weight_decay)
        optimizer = self.optimizer_factory(params=groups)
        for group in optimizer.param_groups:
            group["lr"] *= group.get("lr_scale", 1.0)
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
