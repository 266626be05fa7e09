"""Object detection and instance segmentation as a LightningModule (Mask R-CNN / Faster R-CNN heads).

COCO box and mask mAP come from torchmetrics' ``MeanAveragePrecision`` (COCO's evaluation rules through
pycocotools or faster-coco-eval), over the whole validation set at the original image sizes. A set without a
single scored ground-truth box has no mAP (torchmetrics returns -1): it is logged as NaN, with a warning.

The scores do not depend on the evaluation batch or the number of processes: images are run in groups of one
size (``DetectionTask.predict``), and processes gather their per-image states whole, in rank order
(``GatheredMeanAveragePrecision``), from the contiguous unpadded shards the data modules give them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics.detection import MeanAveragePrecision

from .base import BackboneHeadTask
from .data_inputs import class_name_tuple
from .overlays import draw_detections, write_panels

log = logging.getLogger("mambalab")

Targets = Optional[list[dict[str, Tensor]]]
# torchmetrics' result keys -> the names logged (after "<stage>/<iou type>_"), as mmdet's CocoMetric names them.
LOGGED = {"map": "mAP", "map_50": "mAP_50", "map_75": "mAP_75", "map_small": "mAP_s", "map_medium": "mAP_m",
          "map_large": "mAP_l", "mar_100": "AR_100"}


class GatheredMeanAveragePrecision(MeanAveragePrecision):
    """torchmetrics' COCO mAP whose per-image states are gathered whole from every process, in rank order.

    torchmetrics gathers these lists one image at a time (one collective call per list entry), which needs the
    same number of images on every process (a padded sampler, which scores repeated images) and interleaves the
    processes' images. Here each state list travels as one object per process and the lists are concatenated in
    rank order, so unevenly sharded evaluation sets work and contiguous shards give back the dataset order.
    """

    def _sync_dist(self, dist_sync_fn: Optional[Callable] = None, process_group: Optional[Any] = None) -> None:
        group = process_group or self.process_group
        gathered: list = [None] * dist.get_world_size(group)
        local = {name: [entry.cpu() if isinstance(entry, Tensor) else entry for entry in getattr(self, name)]
                 for name in self._defaults}
        dist.all_gather_object(gathered, local, group=group)
        for name in self._defaults:
            setattr(self, name, [entry.to(self.device) if isinstance(entry, Tensor) else entry
                                 for part in gathered for entry in part[name]])


class DetectionTask(BackboneHeadTask):
    """Trains a two-stage detector (``heads.MaskRCNN``) on a features-only backbone; COCO mAP evaluation.

    Batches are ``(images, targets)``: lists of float ``(3, H, W)`` images in [0, 1] and torchvision target
    dicts (``boxes`` xyxy, ``labels`` 1..num_classes, ``masks`` (N, H, W) for Mask R-CNN, optional
    ``iscrowd`` and ``area`` for evaluation).

    Args:
        backbone: a timm-style model built with ``features_only=True``.
        head: ``heads.MaskRCNN`` (transform, FPN, RPN, RoI heads).
        optimizer: partial optimiser, called with parameter groups (no weight decay on norms, biases,
            A_logs, Ds and the backbone's ``no_weight_decay()`` names).
        num_classes: object classes (without background).
        scheduler: optional partial ``(optimizer, total_steps) -> LRScheduler``, stepped per batch.
        mask_threshold: mask probability threshold for the segm metric and the overlays.
        backend: ``pycocotools`` or ``faster_coco_eval`` (torchmetrics' COCO evaluation backend).
        num_overlays: validation images saved each epoch with predictions | ground truth under ``<run>/overlays/``.
        overlay_score: score threshold of the boxes drawn in overlays.
        compile: wrap the backbone in ``torch.compile`` at fit time.
        weight_decay: weight decay of the decayed parameters (none on norms, biases, A_logs, Ds).
        class_names: one name per class (labels 1..num_classes), written on the overlays (default: the numbers).
    """

    data_inputs = ("num_classes", "class_names")

    def __init__(self, backbone: nn.Module, head: nn.Module, optimizer: Callable, num_classes: int,
                 scheduler: Optional[Callable] = None, mask_threshold: float = 0.5, backend: str = "pycocotools",
                 num_overlays: int = 4, overlay_score: float = 0.3, compile: bool = False, weight_decay: float = 0.0,
                 class_names: Optional[Sequence[str]] = None) -> None:
        super().__init__(backbone, head, optimizer, scheduler, weight_decay)
        class_names = class_name_tuple(class_names, num_classes, type(self).__name__)
        self.save_hyperparameters(ignore=["backbone", "head", "optimizer", "scheduler"], logger=False)
        self.class_names = class_names or ()
        self.iou_types = ("bbox", "segm") if getattr(head, "with_masks", False) else ("bbox",)
        self.metrics = nn.ModuleDict({stage: GatheredMeanAveragePrecision(iou_type=self.iou_types, backend=backend)
                                      for stage in ("val", "test")})
        self._overlays_done = 0

    def forward(self, images: list[Tensor], targets: Targets = None
                ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        """Losses (training) or detections at the original image sizes (evaluation)."""
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        batch, targets = self.head.transform(images, targets)
        losses, detections = self.head(self.backbone(batch.tensors), batch, targets)
        if not self.training:
            detections = self.head.transform.postprocess(detections, batch.image_sizes, original_sizes)
        return losses, detections

    def training_step(self, batch: tuple[list[Tensor], list[dict]], batch_idx: int) -> Tensor:
        images, targets = batch
        losses, _ = self(images, targets)
        loss = sum(losses.values())
        for name, value in losses.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=True, batch_size=len(images))
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(images))
        return loss

    def _metric_inputs(self, detections: list[dict], targets: list[dict]) -> tuple[list[dict], list[dict]]:
        threshold = self.hparams.mask_threshold
        preds, truths = [], []
        for detection, target in zip(detections, targets):
            pred = {key: detection[key] for key in ("boxes", "scores", "labels")}
            truth = {key: target[key] for key in ("boxes", "labels", "iscrowd", "area") if key in target}
            if "segm" in self.iou_types:
                pred["masks"] = detection["masks"][:, 0] > threshold
                truth["masks"] = target["masks"].bool()
            preds.append(pred)
            truths.append(truth)
        return preds, truths

    @torch.no_grad()
    def predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Detections per image that do not depend on which images share the batch.

        The head's transform pads a batch to its largest image, and the padding changes what the model sees:
        a selective scan carries its state across the padded border, and anchors cover the padded area. Images
        are therefore run in groups of one size (equal after the transform's resize), each group as one batch.
        """
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, image in enumerate(images):
            groups.setdefault(tuple(image.shape), []).append(index)
        detections: list[dict[str, Tensor]] = [{} for _ in images]
        for indices in groups.values():
            _, group = self([images[i] for i in indices])
            for index, detection in zip(indices, group):
                detections[index] = detection
        return detections

    def _evaluate(self, batch: tuple[list[Tensor], list[dict]], stage: str) -> None:
        images, targets = batch
        detections = self.predict(images)
        self.metrics[stage].update(*self._metric_inputs(detections, targets))
        if stage == "val" and not self.trainer.sanity_checking:
            self._save_overlays(images, targets, detections)

    def validation_step(self, batch: tuple[list[Tensor], list[dict]], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[list[Tensor], list[dict]], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self._overlays_done = 0

    def _save_overlays(self, images: list[Tensor], targets: list[dict], detections: list[dict]) -> None:
        if self._overlays_done >= self.hparams.num_overlays or self.global_rank != 0:
            return
        for image, target, detection in zip(images, targets, detections):
            if self._overlays_done >= self.hparams.num_overlays:
                break
            truth = {key: value for key, value in target.items() if key in ("boxes", "labels", "masks")}
            name = f"val_epoch{self.current_epoch:03d}_{self._overlays_done}.png"
            predicted = draw_detections(image, detection, self.class_names, self.hparams.overlay_score,
                                        self.hparams.mask_threshold)
            write_panels(Path(self.trainer.default_root_dir) / "overlays" / name,
                         [predicted, draw_detections(image, truth, self.class_names)])
            self._overlays_done += 1

    def evaluation_epoch_end(self, stage: str) -> None:
        metric = self.metrics[stage]
        if not metric.update_called:
            return
        results = metric.compute()
        metric.reset()
        for iou_type in self.iou_types:
            prefix = f"{iou_type}_" if len(self.iou_types) > 1 else ""
            undefined = bool(results[prefix + "map"] == -1)  # torchmetrics' -1: no scored ground truth at all
            if undefined and not self.trainer.sanity_checking and self.global_rank == 0:
                log.warning("%s: the %s set has no scored ground-truth box (all crowd, degenerate or outside their "
                            "image; see the data module's box report): %s mAP is undefined and logged as NaN",
                            type(self).__name__, stage, iou_type)
            for key, name in LOGGED.items():
                value = results.get(prefix + key)
                if value is not None:
                    self.log(f"{stage}/{iou_type}_{name}", torch.full_like(value.float(), float("nan")) if undefined
                             else value.float(), sync_dist=False, prog_bar=key == "map" and iou_type == "bbox")
