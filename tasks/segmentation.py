"""Semantic segmentation as a LightningModule: whole-image or sliding-window inference, mmseg's metrics.

Metrics follow mmseg's ``IoUMetric``: intersections and unions are summed over the whole dataset (a
confusion matrix, torchmetrics' ``MulticlassJaccardIndex``) before dividing, so mIoU is the mean over
classes that occur in the labels or the predictions; aAcc is the fraction of labelled pixels predicted
right. Predictions are compared with the labels at the labels' resolution. A set without a single labelled
pixel has no such scores: they are logged as NaN, with a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassJaccardIndex

from heads.interface import AuxiliaryHead

from .base import BackboneHeadTask
from .data_inputs import class_name_tuple, float_tuple
from .overlays import paint_labels, palette, to_uint8_image, write_panels

log = logging.getLogger("mambalab")

Images = Union[Tensor, Sequence[Tensor]]


def pad_to_multiple(images: Tensor, divisor: int) -> Tensor:
    """Zero-pad the bottom and right of ``(B, C, H, W)`` images up to multiples of ``divisor``."""
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % divisor, -width % divisor
    return F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images


def whole_inference(model: Callable[[Tensor], Tensor], images: Tensor, size_divisor: int = 32) -> Tensor:
    """Logits for whole images at their own size: pad to ``size_divisor``, run, upsample, crop the padding."""
    height, width = images.shape[-2:]
    padded = pad_to_multiple(images, size_divisor)
    logits = F.interpolate(model(padded), size=padded.shape[-2:], mode="bilinear", align_corners=False)
    return logits[..., :height, :width]


def slide_inference(model: Callable[[Tensor], Tensor], images: Tensor, num_classes: int,
                    crop_size: Sequence[int] = (512, 512), stride: Sequence[int] = (341, 341),
                    size_divisor: int = 32) -> Tensor:
    """Logits from overlapping crops, averaged where they overlap (mmseg's ``slide_inference``).

    Windows start every ``stride`` pixels; the last one in each direction is moved back to end at the
    image border, and an image smaller than the crop is one window. Each crop goes through
    ``whole_inference`` (so crops need not be multiples of ``size_divisor``).
    """
    (crop_h, crop_w), (stride_h, stride_w) = crop_size, stride
    batch, _, height, width = images.shape
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    logits = images.new_zeros((batch, num_classes, height, width))
    count = images.new_zeros((1, 1, height, width))
    for row in range(rows):
        for col in range(cols):
            y2, x2 = min(row * stride_h + crop_h, height), min(col * stride_w + crop_w, width)
            y1, x1 = max(y2 - crop_h, 0), max(x2 - crop_w, 0)
            logits[..., y1:y2, x1:x2] += whole_inference(model, images[..., y1:y2, x1:x2], size_divisor)
            count[..., y1:y2, x1:x2] += 1
    return logits / count


def iou_table(confmat: Tensor, class_names: Sequence[str]) -> tuple[str, list[tuple[str, float, float]]]:
    """Per-class IoU and accuracy in percent (NaN for classes absent from labels and predictions): a text
    table of the classes present, and all rows."""
    confmat = confmat.double()
    intersection = confmat.diag()
    union = confmat.sum(0) + confmat.sum(1) - intersection
    iou = torch.where(union > 0, intersection / union.clamp_min(1), torch.full_like(union, float("nan")))
    label_count = confmat.sum(1)
    acc = torch.where(label_count > 0, intersection / label_count.clamp_min(1),
                      torch.full_like(label_count, float("nan")))
    rows = [(name, 100 * float(i), 100 * float(a)) for name, i, a in zip(class_names, iou, acc)]
    present = [row for row in rows if not np.isnan(row[1])]
    width = max(10, *(len(name) for name in class_names))
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}"]
    lines += [f"{name:<{width}}  {i:6.2f}  {a:6.2f}" for name, i, a in present]
    if len(present) < len(rows):
        lines.append(f"({len(rows) - len(present)} classes absent from labels and predictions not listed)")
    return "\n".join(lines), rows


class SegmentationTask(BackboneHeadTask):
    """Pixel-wise cross-entropy training of ``head(backbone features)``, evaluated like mmseg.

    Batches are dicts: ``image`` (a ``(B, C, H, W)`` tensor, or a list of ``(C, H, W)`` tensors when
    evaluation images differ in size) and ``mask`` (long labels, ``ignore_index`` for unlabelled pixels;
    for evaluation at the original resolution, which may differ from the image's).

    Args:
        backbone: a timm-style model built with ``features_only=True``.
        head: a dense head (``UperNet``) mapping the feature list to logits; a head that implements
            ``heads.interface.AuxiliaryHead`` adds its auxiliary loss, weighted by its ``aux_weight``.
        optimizer: partial optimiser, called with parameter groups (no weight decay on norms, biases,
            A_logs, Ds and the backbone's ``no_weight_decay()`` names).
        num_classes: number of classes.
        scheduler: optional partial ``(optimizer, total_steps) -> LRScheduler``, stepped per batch.
        ignore_index: label of unlabelled pixels (no loss, not counted by the metrics).
        inference: ``whole`` (the image at once) or ``slide`` (overlapping crops).
        crop_size: sliding-window crop, one int or (height, width).
        stride: sliding-window stride, one int or (height, width).
        size_divisor: inputs are padded to multiples of this for inference.
        avg_non_ignore: average the loss over labelled pixels only; False divides by all pixels as mmseg's
            CrossEntropyLoss does by default.
        num_overlays: validation images saved each epoch as image | truth | prediction PNGs under
            ``<run>/overlays/``.
        per_class_metrics: also log each class's IoU as ``<stage>/IoU_<class>`` (for small label sets; the
            per-class table is printed and written to ``<run>/per_class_iou_<stage>.csv`` either way).
        compile: wrap the backbone in ``torch.compile`` at fit time.
        weight_decay: weight decay of the decayed parameters (none on norms, biases, A_logs, Ds).
        class_names: one name per class, for the per-class table and metric names (default: the numbers).
        mean, std: the normalisation of the images, undone to draw overlays (without them overlays are
            min-max scaled).
    """

    data_inputs = ("num_classes", "class_names", "mean", "std")

    def __init__(self, backbone: nn.Module, head: nn.Module, optimizer: Callable, num_classes: int,
                 scheduler: Optional[Callable] = None, ignore_index: int = 255, inference: str = "whole",
                 crop_size: Union[int, Sequence[int]] = 512, stride: Union[int, Sequence[int]] = 341,
                 size_divisor: int = 32, avg_non_ignore: bool = False, num_overlays: int = 4,
                 per_class_metrics: bool = False, compile: bool = False, weight_decay: float = 0.0,
                 class_names: Optional[Sequence[str]] = None, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None) -> None:
        super().__init__(backbone, head, optimizer, scheduler, weight_decay)
        if inference not in ("whole", "slide"):
            raise ValueError(f"SegmentationTask: inference must be 'whole' or 'slide', got {inference!r}")
        class_names = class_name_tuple(class_names, num_classes, "SegmentationTask")
        mean, std = float_tuple(mean), float_tuple(std)
        self.save_hyperparameters(ignore=["backbone", "head", "optimizer", "scheduler"], logger=False)
        self.class_names = class_names or tuple(str(i) for i in range(num_classes))
        self.mean, self.std = mean, std
        self.crop_size = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        self.stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
        self.metrics = nn.ModuleDict({stage: MulticlassJaccardIndex(num_classes, average="macro",
                                                                    ignore_index=ignore_index)
                                      for stage in ("val", "test")})
        self._overlays_done = 0

    def forward(self, images: Tensor) -> Tensor:
        """Logits at the resolution of the finest feature level."""
        return self.head(self.backbone(images))

    def cross_entropy(self, logits: Tensor, masks: Tensor) -> Tensor:
        """Cross-entropy of logits upsampled to the label size (mmseg's ``loss_by_feat``)."""
        logits = F.interpolate(logits.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
        ignore = self.hparams.ignore_index
        loss = F.cross_entropy(logits, masks, ignore_index=ignore, reduction="sum")
        count = (masks != ignore).sum() if self.hparams.avg_non_ignore else masks.new_tensor(masks.numel())
        return loss / count.clamp_min(1)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images, masks = batch["image"], batch["mask"]
        features = self.backbone(images)
        loss_decode = self.cross_entropy(self.head(features), masks)
        loss = loss_decode
        aux_logits = self.head.forward_aux(features) if isinstance(self.head, AuxiliaryHead) else None
        if aux_logits is not None:
            loss_aux = self.cross_entropy(aux_logits, masks)
            loss = loss + self.head.aux_weight * loss_aux
            self.log("train/loss_aux", loss_aux, on_step=True, on_epoch=True)
        self.log("train/loss_decode", loss_decode, on_step=True, on_epoch=True)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def predict_logits(self, images: Tensor) -> Tensor:
        """Logits at the images' size with the configured inference mode."""
        if self.hparams.inference == "slide":
            return slide_inference(self, images, self.hparams.num_classes, self.crop_size, self.stride,
                                   self.hparams.size_divisor)
        return whole_inference(self, images, self.hparams.size_divisor)

    def _predict(self, images: Images, label_sizes: Sequence[Sequence[int]]) -> list[Tensor]:
        """Predicted label maps, one per image, at each label's size."""
        if isinstance(images, Tensor) and len({tuple(s) for s in label_sizes}) == 1:
            logits = self.predict_logits(images)
            logits = F.interpolate(logits, size=tuple(label_sizes[0]), mode="bilinear", align_corners=False)
            return list(logits.argmax(1))
        predictions = []
        for image, size in zip(images, label_sizes):
            logits = self.predict_logits(image[None])
            predictions.append(F.interpolate(logits, size=tuple(size), mode="bilinear",
                                             align_corners=False)[0].argmax(0))
        return predictions

    def _evaluate(self, batch: dict, stage: str) -> None:
        masks = batch["mask"]
        masks = list(masks) if isinstance(masks, Tensor) else masks
        predictions = self._predict(batch["image"], [m.shape[-2:] for m in masks])
        for prediction, mask in zip(predictions, masks):
            self.metrics[stage].update(prediction.flatten(), mask.flatten())
        if stage == "val" and not self.trainer.sanity_checking:
            self._save_overlays(batch["image"], masks, predictions)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self._overlays_done = 0

    def _save_overlays(self, images: Images, masks: Sequence[Tensor], predictions: Sequence[Tensor]) -> None:
        if self._overlays_done >= self.hparams.num_overlays or self.global_rank != 0:
            return
        colours, skip = palette(self.hparams.num_classes), (self.hparams.ignore_index,)
        for image, mask, prediction in zip(images, masks, predictions):
            if self._overlays_done >= self.hparams.num_overlays:
                break
            image = F.interpolate(image[None].float(), size=mask.shape[-2:], mode="bilinear", align_corners=False)
            rgb = to_uint8_image(image[0], self.mean, self.std)
            name = f"val_epoch{self.current_epoch:03d}_{self._overlays_done}.png"
            write_panels(Path(self.trainer.default_root_dir) / "overlays" / name,
                         [rgb, paint_labels(rgb, mask, colours, skip), paint_labels(rgb, prediction, colours, skip)])
            self._overlays_done += 1

    def evaluation_epoch_end(self, stage: str) -> None:
        metric = self.metrics[stage]
        if not metric.update_called:
            return
        miou = metric.compute()
        with metric.sync_context(should_sync=True, should_unsync=True):
            confmat = metric.confmat.clone()
        metric.reset()
        if not confmat.sum():
            self._no_labelled_pixels(stage)
            return
        self.log(f"{stage}/mIoU", miou, sync_dist=False, prog_bar=True)
        self.log(f"{stage}/aAcc", confmat.diag().sum() / confmat.sum(), sync_dist=False)
        table, rows = iou_table(confmat, self.class_names)
        self.log(f"{stage}/mAcc", torch.tensor(np.nanmean([acc for _, _, acc in rows]) / 100), sync_dist=False)
        if self.hparams.per_class_metrics:
            for name, iou, _ in rows:
                if not np.isnan(iou):
                    self.log(f"{stage}/IoU_{name.replace(' ', '_')}", iou / 100, sync_dist=False)
        if self.trainer.sanity_checking or self.global_rank != 0:
            return
        log.info("%s per-class IoU (epoch %d):\n%s", stage, self.current_epoch, table)
        directory = Path(self.trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        lines = ["class,IoU,Acc"] + [f"{name},{iou:.2f},{acc:.2f}" for name, iou, acc in rows]
        (directory / f"per_class_iou_{stage}.csv").write_text("\n".join(lines) + "\n")

    def _no_labelled_pixels(self, stage: str) -> None:
        """A set whose labels are all ``ignore_index`` has no scores: NaN is logged, and a warning says why."""
        for name in ("mIoU", "aAcc", "mAcc"):
            self.log(f"{stage}/{name}", float("nan"), sync_dist=False, prog_bar=name == "mIoU")
        if not self.trainer.sanity_checking and self.global_rank == 0:
            log.warning("%s: no labelled pixel in the whole %s set (every label is ignore_index=%d): mIoU, aAcc "
                        "and mAcc are undefined and logged as NaN", type(self).__name__, stage,
                        self.hparams.ignore_index)
