"""Medical image segmentation as a LightningModule, evaluated as the Synapse/ACDC/ISIC papers do.

Training: ``ce_weight * CE + dice_weight * soft Dice`` on augmented 2-D slices (BCE + binary Dice when the
model has one sigmoid output, as VM-UNet on ISIC), optionally with the encoder frozen for the first epochs
(MSVM-UNet freezes it for 10).

Evaluation is per case (a volume, or one image as a volume of depth 1): every slice is zoomed to the network's
input size (cubic, ``scipy.ndimage.zoom`` order 3), normalised, segmented, and the label map zoomed back to the
slice's size (nearest, order 0), as TransUNet's ``test_single_volume`` which VM-UNet and MSVM-UNet inherit.
For every foreground class and case it computes DSC and HD95, then averages over cases, then over classes.

Metric conventions (stated because the papers differ in what they leave out):

* DSC = 2|P & G| / (|P| + |G|) on the whole case (3-D for volumes).
* HD95 is MONAI's ``compute_hausdorff_distance(percentile=95)``: the larger of the two directed 95th
  percentiles of surface-to-surface distances, in mm when the case's voxel spacing is known, else in voxels
  (the published Synapse "mm" figures are voxel units: TransUNet's volumes carry no spacing). medpy's
  ``hd95``, used by TransUNet and VM-UNet, takes the 95th percentile of both directions pooled, which can be
  slightly smaller.
* Empty masks follow TransUNet's ``calculate_metric_percase``, so numbers compare with the papers: prediction
  and label both non-empty -> (DSC, HD95); prediction non-empty, label empty -> (1, 0); prediction empty ->
  (0, 0), also when the label is empty too. The table reports how many (case, class) pairs were decided
  by this rule; HD95 averages include their zeros, as the papers' do.

Pixel-level scores summed over the whole evaluation set (ISIC's protocol in VM-UNet: IoU, DSC, and for a
binary task accuracy, sensitivity and specificity) are logged beside them.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from .base import BackboneHeadTask
from .data_inputs import class_name_tuple, float_tuple, require, size_pair
from .losses import DiceCELoss
from .overlays import paint_labels, palette, to_uint8_image, write_panels

log = logging.getLogger("mambalab")


def cosine_annealing_epochs(optimizer: Optimizer, total_steps: int, epochs: int, t_max: Optional[int] = None,
                            min_lr_ratio: float = 0.0) -> LambdaLR:
    """PyTorch's ``CosineAnnealingLR(T_max, eta_min)`` stepped once per epoch, as the medical references use it.

    The factor at epoch e is ``min + (1 - min) * (1 + cos(pi * e / t_max)) / 2``; with ``t_max`` below the
    number of epochs the rate rises again after ``t_max`` (VM-UNet: 300 epochs with T_max 100 on Synapse,
    50 on ISIC). ``t_max`` defaults to ``epochs``; ``min_lr_ratio`` is eta_min over the base rate.
    """
    if epochs < 1:
        raise ValueError(f"cosine_annealing_epochs: epochs must be >= 1 (the trainer's max_epochs), got {epochs}")
    t_max = t_max or epochs
    steps_per_epoch = max(total_steps, 1) / epochs

    def factor(step: int) -> float:
        epoch = math.floor(step / steps_per_epoch)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * epoch / t_max))

    return LambdaLR(optimizer, factor)


def hd95(prediction: np.ndarray, target: np.ndarray, spacing: Optional[Sequence[float]] = None) -> float:
    """95th-percentile symmetric Hausdorff distance of two non-empty boolean masks (MONAI), in spacing units."""
    try:
        from monai.metrics import compute_hausdorff_distance
    except ImportError as err:
        raise ImportError("HD95 needs MONAI: pip install 'mambalab[medical]' (monai, h5py, nibabel)") from err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        distance = compute_hausdorff_distance(
            torch.from_numpy(np.ascontiguousarray(prediction))[None, None],
            torch.from_numpy(np.ascontiguousarray(target))[None, None],
            include_background=True, percentile=95,
            spacing=None if spacing is None else [float(s) for s in spacing])
    return float(distance.reshape(-1)[0])


def case_metrics(prediction: np.ndarray, target: np.ndarray,
                 spacing: Optional[Sequence[float]] = None) -> tuple[float, float, bool]:
    """(DSC, HD95, decided by the empty-mask convention) for one structure in one case.

    ``prediction`` and ``target`` are boolean masks of the same shape; a leading axis of length 1 is
    dropped (a 2-D image), keeping the last two spacing entries. Conventions: see the module docstring.
    """
    prediction, target = np.asarray(prediction, dtype=bool), np.asarray(target, dtype=bool)
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {prediction.shape} and label {target.shape} differ in shape")
    if prediction.ndim == 3 and prediction.shape[0] == 1:
        prediction, target = prediction[0], target[0]
        spacing = None if spacing is None else tuple(spacing)[-2:]
    if not prediction.any():
        return 0.0, 0.0, True
    if not target.any():
        return 1.0, 0.0, True
    dsc = 2.0 * np.logical_and(prediction, target).sum() / (prediction.sum() + target.sum())
    return float(dsc), hd95(prediction, target, spacing), False


def zoom_planes(array: np.ndarray, size: Sequence[int], order: int) -> np.ndarray:
    """Zoom the last two axes of ``array`` to ``size`` (scipy spline of ``order``), plane by plane."""
    height, width = array.shape[-2:]
    if (height, width) == tuple(size):
        return array
    try:
        from scipy.ndimage import zoom
    except ImportError as err:
        raise ImportError("slice-wise evaluation needs scipy: pip install 'mambalab[medical]'") from err
    factors = (size[0] / height, size[1] / width)
    planes = array.reshape(-1, height, width)
    out = np.stack([zoom(plane, factors, order=order) for plane in planes])
    return out.reshape(*array.shape[:-2], *out.shape[-2:])


@torch.no_grad()
def predict_volume(model: Callable[[Tensor], Tensor], volume: np.ndarray, patch_size: Sequence[int],
                   mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,), in_chans: int = 1,
                   batch_size: int = 16, device: Union[str, torch.device] = "cpu") -> np.ndarray:
    """Label map ``(D, H, W)`` of a ``(D, H, W)`` or ``(D, C, H, W)`` case, slice by slice.

    Each slice is zoomed to ``patch_size`` (order 3), normalised with ``mean``/``std``, its channels
    repeated up to ``in_chans``, segmented (argmax, or logit > 0 for one output channel), and the labels
    zoomed back (order 0).
    """
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim == 3:
        volume = volume[:, None]
    if volume.ndim != 4:
        raise ValueError(f"expected a (D, H, W) or (D, C, H, W) case, got shape {volume.shape}")
    height, width = volume.shape[-2:]
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    labels = []
    for start in range(0, volume.shape[0], batch_size):
        slices = torch.from_numpy(zoom_planes(volume[start:start + batch_size], patch_size, order=3))
        slices = (slices - mean_t) / std_t
        if slices.shape[1] < in_chans:
            slices = slices.repeat(1, in_chans // slices.shape[1], 1, 1)
        logits = model(slices.to(device)).float()
        if logits.shape[-2:] != tuple(patch_size):
            logits = F.interpolate(logits, size=tuple(patch_size), mode="bilinear", align_corners=False)
        predicted = (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)
        labels.append(predicted.cpu().numpy().astype(np.int64))
    return zoom_planes(np.concatenate(labels), (height, width), order=0)


def evaluate_case(prediction: np.ndarray, label: np.ndarray, classes: Sequence[int],
                  spacing: Optional[Sequence[float]] = None) -> np.ndarray:
    """``(len(classes), 3)``: DSC, HD95 and the empty-convention flag per class for one case."""
    return np.array([case_metrics(prediction == c, label == c, spacing) for c in classes], dtype=np.float64)


def metrics_table(values: np.ndarray, class_names: Sequence[str], unit: str, title: str = "") -> str:
    """Per-class mean DSC (%) and HD95 over cases, their means, and the papers' one-line row.

    ``values`` is ``(cases, classes, 3)`` from ``evaluate_case``.
    """
    dsc, distance, empty = values[..., 0].mean(0) * 100, values[..., 1].mean(0), int(values[..., 2].sum())
    width = max(8, *(len(name) for name in class_names))
    lines = [title] if title else []
    lines.append(f"{'class':<{width}}  {'DSC (%)':>8}  {'HD95 (' + unit + ')':>14}")
    lines += [f"{name:<{width}}  {d:8.2f}  {h:14.2f}" for name, d, h in zip(class_names, dsc, distance)]
    lines.append(f"{'mean':<{width}}  {dsc.mean():8.2f}  {distance.mean():14.2f}")
    lines.append("paper row: DSC | HD95 | " + " | ".join(class_names))
    lines.append(f"           {dsc.mean():.2f} | {distance.mean():.2f} | " + " | ".join(f"{d:.2f}" for d in dsc))
    if empty:
        lines.append(f"({empty} of {values.shape[0] * values.shape[1]} case-class pairs had an empty prediction or "
                     f"label and were scored by TransUNet's rule: prediction only -> DSC 1, HD95 0; "
                     f"no prediction -> DSC 0, HD95 0)")
    return "\n".join(lines)


def gather_objects(items: Sequence) -> list:
    """Every process's ``items`` concatenated in rank order (``items`` itself without a process group): the
    case names that go with the per-case rows ``CaseMetrics`` gathers in the same order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(items)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(items))
    return [item for part in gathered for item in part]


class CaseMetrics(Metric):
    """Per-case, per-class (DSC, HD95, empty flag) rows and pixel counts (TP, FP, FN, TN per class),
    gathered across processes."""

    full_state_update = False

    def __init__(self, num_eval_classes: int) -> None:
        super().__init__()
        self.add_state("cases", default=[], dist_reduce_fx="cat")
        self.add_state("counts", default=torch.zeros(num_eval_classes, 4, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, case: Tensor, counts: Tensor) -> None:
        self.cases.append(case[None])
        self.counts += counts

    def compute(self) -> tuple[Tensor, Tensor]:
        return dim_zero_cat(self.cases), self.counts


class MedicalSegmentationTask(BackboneHeadTask):
    """Dice + CE training of ``head(backbone features)``; per-case DSC/HD95 evaluation tabled per class.

    Training batches are dicts with ``image`` ``(B, C, H, W)`` and ``label`` ``(B, H, W)``. Evaluation
    batches are lists of cases: dicts with ``image`` (``(D, H, W)`` or ``(D, C, H, W)`` array, un-normalised),
    ``label`` ``(D, H, W)``, ``case`` (name) and ``spacing`` (``(z, y, x)`` or None). Evaluation zooms, normalises
    and channel-repeats slices as the data module does for training, so the task is told ``img_size``, ``mean``,
    ``std`` and ``in_chans`` (run.py passes the data module's); building it without them is an error.

    Args:
        backbone: a timm-style model built with ``features_only=True``.
        head: a decoder mapping the feature list to logits (``VMUNetDecoder``, ``MSVMUNetDecoder``); when its
            ``encoder_init`` is set, ``head.init_from_encoder(backbone)`` copies encoder blocks into it.
        optimizer: partial optimiser, called with parameter groups (no weight decay on norms, biases,
            A_logs, Ds and the backbone's ``no_weight_decay()`` names).
        num_classes: output channels (classes including background, or 1 for a sigmoid foreground).
        scheduler: optional partial ``(optimizer, total_steps) -> LRScheduler``, stepped per batch.
        ce_weight: weight of cross-entropy (BCE for one output channel).
        dice_weight: weight of the soft Dice loss.
        freeze_encoder_epochs: keep the backbone's weights fixed during the first this many epochs.
        eval_batch_size: slices per forward pass during evaluation.
        num_overlays: cases per evaluation saved as image | label | prediction PNGs under ``<run>/overlays``
            (the slice with the most labelled pixels).
        compile: wrap the backbone in ``torch.compile`` at fit time.
        weight_decay: weight decay of the decayed parameters (none on norms, biases, A_logs, Ds).
        img_size: the network input size ``(height, width)`` (or one int) every evaluation slice is zoomed to.
        mean, std: the normalisation applied after the zoom, one value per image channel.
        in_chans: image channels the network takes (grey slices are repeated to it).
        class_names: names of the foreground classes, for tables and metric names (default: the numbers).
    """

    data_inputs = ("num_classes", "img_size", "mean", "std", "in_chans", "class_names")

    def __init__(self, backbone: nn.Module, head: nn.Module, optimizer: Callable, num_classes: int,
                 scheduler: Optional[Callable] = None, ce_weight: float = 0.4, dice_weight: float = 0.6,
                 freeze_encoder_epochs: int = 0, eval_batch_size: int = 16, num_overlays: int = 4,
                 compile: bool = False, weight_decay: float = 0.0, img_size: Union[None, int, Sequence[int]] = None,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                 in_chans: Optional[int] = None, class_names: Optional[Sequence[str]] = None) -> None:
        super().__init__(backbone, head, optimizer, scheduler, weight_decay)
        require(type(self).__name__, img_size=img_size, mean=mean, std=std, in_chans=in_chans)
        self.eval_classes = [1] if num_classes == 1 else list(range(1, num_classes))
        img_size, mean, std, in_chans = size_pair(img_size), float_tuple(mean), float_tuple(std), int(in_chans)
        class_names = class_name_tuple(class_names, len(self.eval_classes), type(self).__name__)
        self.save_hyperparameters(ignore=["backbone", "head", "optimizer", "scheduler"], logger=False)
        self.class_names = class_names or tuple(str(c) for c in self.eval_classes)
        self.loss = DiceCELoss(ce_weight, dice_weight)
        self.metrics = nn.ModuleDict({stage: CaseMetrics(len(self.eval_classes)) for stage in ("val", "test")})
        self._cases_seen: dict[str, list[tuple[str, bool]]] = {"val": [], "test": []}
        if getattr(head, "encoder_init", False):
            copied = head.init_from_encoder(backbone)
            log.info("decoder initialised from the encoder: %d blocks copied", copied)

    def forward(self, images: Tensor) -> Tensor:
        """Logits at the input resolution."""
        logits = self.head(self.backbone(images))
        if logits.shape[-2:] != images.shape[-2:]:
            logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits

    def on_train_epoch_start(self) -> None:
        if self.hparams.freeze_encoder_epochs:
            frozen = self.current_epoch < self.hparams.freeze_encoder_epochs
            for param in self.backbone.parameters():
                param.requires_grad_(not frozen)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        losses = self.loss(self(batch["image"]), batch["label"])
        self.log("train/loss", losses["loss"], on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/ce", losses["ce"], on_step=False, on_epoch=True)
        self.log("train/dice", losses["dice"], on_step=False, on_epoch=True)
        return losses["loss"]

    def _evaluate(self, cases: Sequence[dict], stage: str) -> None:
        hparams = self.hparams
        for case in cases:
            prediction = predict_volume(self, case["image"], hparams.img_size, hparams.mean, hparams.std,
                                        hparams.in_chans, hparams.eval_batch_size, self.device)
            label = np.asarray(case["label"]).astype(np.int64)
            if prediction.shape != label.shape:
                raise ValueError(f"case {case['case']}: label shape {label.shape} does not match its image "
                                 f"{prediction.shape}")
            values = evaluate_case(prediction, label, self.eval_classes, case.get("spacing"))
            counts = np.array([[np.sum(p & t), np.sum(p & ~t), np.sum(~p & t), np.sum(~p & ~t)]
                               for p, t in ((prediction == c, label == c) for c in self.eval_classes)])
            self.metrics[stage].update(torch.from_numpy(values).to(self.device),
                                       torch.from_numpy(counts.astype(np.float64)).to(self.device))
            self._cases_seen[stage].append((str(case["case"]), case.get("spacing") is not None))
            if len(self._cases_seen[stage]) <= self.hparams.num_overlays and self.global_rank == 0 \
                    and not self.trainer.sanity_checking:
                self._save_overlay(case, prediction, label, stage)

    def _save_overlay(self, case: dict, prediction: np.ndarray, label: np.ndarray, stage: str) -> None:
        index = int(np.argmax((label > 0).reshape(label.shape[0], -1).sum(1)))
        name = f"{stage}_epoch{self.current_epoch:03d}_{case['case']}_slice{index:03d}.png"
        rgb = to_uint8_image(np.asarray(case["image"])[index])
        colours = palette(max(self.hparams.num_classes, 2))
        write_panels(Path(self.trainer.default_root_dir) / "overlays" / name,
                     [rgb, paint_labels(rgb, label[index], colours, skip=(0,)),
                      paint_labels(rgb, prediction[index], colours, skip=(0,))])

    def validation_step(self, batch: Sequence[dict], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Sequence[dict], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self._cases_seen["val"] = []

    def on_test_epoch_start(self) -> None:
        self._cases_seen["test"] = []

    def evaluation_epoch_end(self, stage: str) -> None:
        metric = self.metrics[stage]
        if not metric.update_called:
            return
        cases, counts = metric.compute()
        metric.reset()
        seen = gather_objects(self._cases_seen[stage])
        values, counts = cases.double().cpu().numpy(), counts.double().cpu().numpy()
        names = self.class_names
        self.log(f"{stage}/DSC", float(values[..., 0].mean()), prog_bar=True)
        self.log(f"{stage}/HD95", float(values[..., 1].mean()), prog_bar=True)
        for name, (dsc, distance) in zip(names, values[..., :2].mean(0)):
            key = name.replace(" ", "_")
            self.log(f"{stage}/DSC_{key}", float(dsc))
            self.log(f"{stage}/HD95_{key}", float(distance))
        self.log(f"{stage}/pixel_DSC", float(np.mean(2 * counts[:, 0] / np.maximum(
            2 * counts[:, 0] + counts[:, 1] + counts[:, 2], 1))))
        self.log(f"{stage}/pixel_IoU", float(np.mean(counts[:, 0] / np.maximum(counts[:, :3].sum(1), 1))))
        if len(self.eval_classes) == 1:
            tp, fp, fn, tn = counts[0]
            self.log(f"{stage}/accuracy", float((tp + tn) / max(tp + fp + fn + tn, 1)))
            self.log(f"{stage}/sensitivity", float(tp / max(tp + fn, 1)))
            self.log(f"{stage}/specificity", float(tn / max(tn + fp, 1)))
        if self.trainer.sanity_checking or self.global_rank != 0:
            return
        unit = "mm" if seen and all(has_spacing for _, has_spacing in seen) else "voxels"
        title = f"{stage} (epoch {self.current_epoch}, {values.shape[0]} cases): per-class DSC and HD95"
        table = metrics_table(values, names, unit, title)
        log.info("\n%s", table)
        directory = Path(self.trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"medseg_{stage}.txt").write_text(table + "\n")
        case_names = [name for name, _ in seen]
        if len(case_names) == values.shape[0]:
            header = "case," + ",".join(f"DSC_{n},HD95_{n}" for n in names)
            rows = [f"{case}," + ",".join(f"{d:.4f},{h:.4f}" for d, h, _ in row)
                    for case, row in zip(case_names, values)]
            (directory / f"medseg_{stage}_cases.csv").write_text("\n".join([header, *rows]) + "\n")
