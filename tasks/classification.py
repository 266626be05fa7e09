"""Image classification as a LightningModule: any backbone, any head, top-1/top-5, optional DeiT distillation."""

from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from .base import BackboneHeadTask
from .optim import param_groups_layer_decay, param_groups_weight_decay

DISTILLATION_TYPES = ("hard", "soft")


class ClassificationTask(BackboneHeadTask):
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
        teacher: optional frozen teacher for DeiT-style distillation (e.g. ``timm.create_model("regnety_160",
            pretrained=True, pretrained_cfg_overlay=dict(file=...))``); adds a distillation head.
        distill_alpha: weight of the distillation loss; the label loss gets ``1 - distill_alpha``.
        distill_type: "hard" (cross-entropy against the teacher's argmax, as DeiT and GroupMamba train)
            or "soft" (KL divergence at temperature ``distill_tau``).
        distill_tau: softening temperature of "soft" distillation.
        weight_decay: weight decay of the decayed parameters (none on norms, biases, A_logs, Ds).
        batch_transform: ``(images, targets) -> (images, soft targets)`` applied to training batches
            (the data module's Mixup/CutMix), or None.

    With a ``batch_transform`` the loss becomes soft-target cross-entropy. With a teacher, the model has two
    heads on the same pooled features: ``head`` learns the labels, ``dist_head`` the teacher's predictions,
    and at evaluation the two heads' logits are averaged (DeiT's convention).
    """

    data_inputs = ("num_classes", "batch_transform")

    def __init__(self, backbone: nn.Module, head: nn.Module, optimizer: Callable, num_classes: int,
                 scheduler: Optional[Callable] = None, label_smoothing: float = 0.0,
                 layer_decay: Optional[float] = None, compile: bool = False, teacher: Optional[nn.Module] = None,
                 distill_alpha: float = 0.5, distill_type: str = "hard", distill_tau: float = 1.0,
                 weight_decay: float = 0.0, batch_transform: Optional[Callable] = None) -> None:
        super().__init__(backbone, head, optimizer, scheduler, weight_decay)
        self.save_hyperparameters(ignore=["backbone", "head", "optimizer", "scheduler", "teacher", "batch_transform"],
                                  logger=False)
        self.batch_transform = batch_transform
        if distill_type not in DISTILLATION_TYPES:
            raise ValueError(f"distill_type must be one of {DISTILLATION_TYPES}, got {distill_type!r}")
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None else None
        self.dist_head = self._new_head_like(head) if teacher is not None else None
        top_k = min(5, num_classes)
        self.metrics = nn.ModuleDict({
            f"{stage}_acc": MulticlassAccuracy(num_classes, average="micro") for stage in ("val", "test")})
        self.metrics.update({
            f"{stage}_acc_top{top_k}": MulticlassAccuracy(num_classes, top_k=top_k, average="micro")
            for stage in ("val", "test")})
        # The evaluation loss is a sample-weighted mean kept as metric states (sums), which synchronise exactly when
        # processes hold different numbers of samples; Lightning's own mean over processes truncates the sample count.
        self.metrics.update({f"{stage}_loss": MeanMetric() for stage in ("val", "test")})
        self.top_k = top_k
        self.val_acc_best = MaxMetric()
        self.train_loss = MeanMetric()

    @staticmethod
    def _new_head_like(head: nn.Module) -> nn.Module:
        """A freshly initialised copy of ``head`` (same class and shapes) for the distillation logits."""
        dist_head = copy.deepcopy(head)
        for module in dist_head.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        return dist_head

    def forward(self, images: Tensor) -> Tensor:
        """Logits; with a distillation head, the mean of both heads' logits."""
        features = self.backbone(images)
        if self.dist_head is None:
            return self.head(features)
        return (self.head(features) + self.dist_head(features)) / 2

    def train(self, mode: bool = True) -> "ClassificationTask":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def _label_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        if targets.ndim == 2:
            return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.hparams.label_smoothing)

    def _distillation_loss(self, images: Tensor, dist_logits: Tensor) -> Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(images).float()
        if teacher_logits.shape != dist_logits.shape:
            raise ValueError(f"teacher outputs {tuple(teacher_logits.shape[1:])} classes but the task has "
                             f"{dist_logits.shape[1]}; build the teacher with num_classes={dist_logits.shape[1]}")
        if self.hparams.distill_type == "hard":
            return F.cross_entropy(dist_logits.float(), teacher_logits.argmax(dim=-1))
        tau = self.hparams.distill_tau
        return F.kl_div(F.log_softmax(dist_logits.float() / tau, dim=-1), F.log_softmax(teacher_logits / tau, dim=-1),
                        reduction="batchmean", log_target=True) * tau * tau

    def training_loss(self, images: Tensor, targets: Tensor) -> Tensor:
        """Label loss (hard or soft targets), mixed with the distillation loss when there is a teacher."""
        features = self.backbone(images)
        loss = self._label_loss(self.head(features), targets)
        if self.dist_head is None:
            return loss
        alpha = self.hparams.distill_alpha
        return (1 - alpha) * loss + alpha * self._distillation_loss(images, self.dist_head(features))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, targets = batch
        if self.batch_transform is not None:
            images, targets = self.batch_transform(images, targets)
        loss = self.training_loss(images, targets)
        self.train_loss(loss.detach())
        self.log("train/loss", self.train_loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        images, targets = batch
        logits = self(images).float()
        self.metrics[f"{stage}_loss"].update(F.cross_entropy(logits, targets), weight=len(targets))
        self.log(f"{stage}/loss", self.metrics[f"{stage}_loss"], on_epoch=True, prog_bar=True)
        for name in (f"{stage}_acc", f"{stage}_acc_top{self.top_k}"):
            self.metrics[name](logits, targets)
            self.log(name.replace("_", "/", 1), self.metrics[name], on_epoch=True, prog_bar=name.endswith("_acc"))

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def evaluation_epoch_end(self, stage: str) -> None:
        if stage != "val" or self.trainer.sanity_checking:
            return
        self.val_acc_best(self.metrics["val_acc"].compute())
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """Backbone and heads (the teacher is frozen), with layer-wise lr decay when configured."""
        heads = nn.ModuleList([self.head] + ([self.dist_head] if self.dist_head is not None else []))
        if self.hparams.layer_decay:
            return param_groups_layer_decay(self.backbone, heads, weight_decay, self.hparams.layer_decay)
        return param_groups_weight_decay([self.backbone, heads], weight_decay)
