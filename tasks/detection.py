"""Object detection and instance segmentation as a LightningModule (Mask R-CNN / Faster R-CNN heads).

COCO box and mask mAP come from torchmetrics' ``MeanAveragePrecision`` (COCO's evaluation rules through
pycocotools or faster-coco-eval), over the whole validation set at the original image sizes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torchmetrics.detection import MeanAveragePrecision

from .base import BackboneHeadTask

Targets = Optional[list[dict[str, Tensor]]]
# torchmetrics' result keys -> the names logged (after "<stage>/<iou type>_"), as mmdet's CocoMetric names them.
LOGGED = {"map": "mAP", "map_50": "mAP_50", "map_75": "mAP_75", "map_small": "mAP_s", "map_medium": "mAP_m",
          "map_large": "mAP_l", "mar_100": "AR_100"}


def draw_detections(image: Tensor, detections: dict[str, Tensor], class_names: Sequence[str],
                    score_threshold: float = 0.3, mask_threshold: float = 0.5) -> Tensor:
    """A uint8 ``(3, H, W)`` picture of an image in [0, 1] with boxes, labels and (when present) masks."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    picture = (image.detach().float().cpu().clamp(0, 1) * 255).round().byte()
    if picture.shape[0] == 1:
        picture = picture.expand(3, -1, -1)
    scores = detections.get("scores")
    keep = scores >= score_threshold if scores is not None else torch.ones(len(detections["boxes"]), dtype=torch.bool)
    boxes, labels = detections["boxes"][keep].detach().cpu(), detections["labels"][keep].detach().cpu()
    if "masks" in detections and keep.any():
        masks = detections["masks"][keep].detach().cpu()
        masks = (masks[:, 0] if masks.ndim == 4 else masks).float() > mask_threshold
        picture = draw_segmentation_masks(picture, masks, alpha=0.45)
    names = [class_names[int(label) - 1] if 0 < int(label) <= len(class_names) else str(int(label))
             for label in labels]
    if scores is not None:
        names = [f"{name} {float(score):.2f}" for name, score in zip(names, scores[keep].detach().cpu())]
    return draw_bounding_boxes(picture, boxes, labels=names, colors="yellow" if scores is not None else "lime",
                               width=2)


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
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, optimizer: Callable, num_classes: int,
                 scheduler: Optional[Callable] = None, mask_threshold: float = 0.5, backend: str = "pycocotools",
                 num_overlays: int = 4, overlay_score: float = 0.3, compile: bool = False) -> None:
        super().__init__(backbone, head, optimizer, scheduler)
        self.save_hyperparameters(ignore=["backbone", "head", "optimizer", "scheduler"], logger=False)
        self.iou_types = ("bbox", "segm") if getattr(head, "with_masks", False) else ("bbox",)
        self.metrics = nn.ModuleDict({stage: MeanAveragePrecision(iou_type=self.iou_types, backend=backend)
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

    def _evaluate(self, batch: tuple[list[Tensor], list[dict]], stage: str) -> None:
        images, targets = batch
        _, detections = self(images)
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
        from torchvision.utils import save_image

        directory = Path(self.trainer.default_root_dir) / "overlays"
        directory.mkdir(parents=True, exist_ok=True)
        names = getattr(getattr(self.trainer, "datamodule", None), "class_names", None) or []
        for image, target, detection in zip(images, targets, detections):
            if self._overlays_done >= self.hparams.num_overlays:
                break
            truth = {key: value for key, value in target.items() if key in ("boxes", "labels", "masks")}
            panels = torch.cat([draw_detections(image, detection, names, self.hparams.overlay_score,
                                                self.hparams.mask_threshold),
                                draw_detections(image, truth, names)], dim=-1)
            save_image(panels.float() / 255, directory / f"val_epoch{self.current_epoch:03d}_{self._overlays_done}.png")
            self._overlays_done += 1

    def evaluation_epoch_end(self, stage: str) -> None:
        metric = self.metrics[stage]
        if not metric.update_called:
            return
        results = metric.compute()
        metric.reset()
        for iou_type in self.iou_types:
            prefix = f"{iou_type}_" if len(self.iou_types) > 1 else ""
            for key, name in LOGGED.items():
                value = results.get(prefix + key)
                if value is not None:
                    self.log(f"{stage}/{iou_type}_{name}", value.float(), sync_dist=False,
                             prog_bar=key == "map" and iou_type == "bbox")
