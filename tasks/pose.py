"""Top-down human pose estimation as a LightningModule: heatmap regression, COCO keypoint AP/AR.

Training minimises mmpose's ``KeypointMSELoss`` with target weights: the squared heatmap error times each
keypoint's weight (0 for unlabelled ones), averaged over every heatmap pixel. Evaluation runs the flip
test, decodes and rescores the crops and evaluates all of them at the end of the epoch with pycocotools
(``tasks.pose_eval``), writes the COCO results file ``keypoints_<stage>.json`` and skeleton overlays.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .base import BackboneHeadTask
from .pose_eval import coco_keypoint_stats, coco_sigmas, decode_heatmaps, flip_back, select_instances, to_image

log = logging.getLogger("mambalab")

# COCO's 17 keypoints: the mirror of each, for the flip test when the datamodule does not say.
COCO_FLIP_INDICES = (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15)


def keypoint_mse_loss(heatmaps: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """Mean over all heatmap pixels of the squared error times the keypoint's weight (mmpose's
    ``KeypointMSELoss(use_target_weight=True)``)."""
    return ((heatmaps.float() - targets) ** 2 * weights[..., None, None]).mean()


def draw_poses(image: Tensor, poses: Tensor, visible: Tensor, skeleton: Sequence[tuple[int, int]],
               colour: str) -> Tensor:
    """A uint8 ``(3, H, W)`` image with each pose's visible keypoints and the skeleton between them."""
    from torchvision.utils import draw_keypoints

    if not len(poses):
        return image
    radius = max(2, round(min(image.shape[-2:]) / 160))
    return draw_keypoints(image, poses.float(), connectivity=list(skeleton), colors=colour, radius=radius,
                          width=max(1, radius - 1), visibility=visible)


class PoseTask(BackboneHeadTask):
    """Trains a heatmap head (``heads.TopdownHeatmapHead``) on person crops; COCO keypoint evaluation.

    Training batches hold ``image`` (B, 3, h, w), ``heatmaps`` (B, K, h/4, w/4) and ``weights`` (B, K);
    evaluation batches ``image``, ``center`` and ``scale`` (crop box), ``score`` (box score), ``image_id``
    and ``key`` (``datamodules.COCOKeypointsDataModule``). What it needs to know about the data is passed in
    at construction (run.py reads these attributes of the data module, see ``data_inputs``).

    Args:
        backbone: a timm-style model built with ``features_only=True``.
        head: the heatmap head.
        optimizer: partial optimiser, called with parameter groups (no weight decay on norms, biases,
            A_logs, Ds and the backbone's ``no_weight_decay()`` names).
        num_classes: keypoints.
        scheduler: optional partial ``(optimizer, total_steps) -> LRScheduler``, stepped per batch.
        weight_decay: weight decay of the decayed parameters.
        coco_gt: the evaluation ground truth (a pycocotools ``COCO``); needed to evaluate, not to train.
        flip_indices: mirror keypoint of each keypoint (default: COCO's).
        sigmas: per-keypoint OKS constants (default: COCO's).
        skeleton: keypoint pairs joined in the overlays (0-based).
        image_path: ``image_id -> path`` of an evaluation image, for the overlays.
        flip_test: average with the mirrored crop's heatmaps.
        shift_heatmap: shift the mirrored heatmaps one pixel (mmpose's flip-test default).
        score_threshold: keypoint score above which a keypoint counts in the instance score.
        nms_threshold: OKS above which the lower-scoring of two poses of an image is dropped (None: no NMS).
        decay_all_parameters: weight decay on every parameter, as mmengine's default optimiser constructor
            in the official pose configs (False: none on norms, biases, A_logs and Ds, the project default).
        num_overlays: evaluation images drawn each validation epoch (prediction | ground truth) under
            ``<run>/overlays/``.
        overlay_score: keypoints scoring below this are not drawn.
        compile: wrap the backbone in ``torch.compile`` at fit time.
    """

    data_inputs = ("num_classes", "coco_gt", "flip_indices", "sigmas", "skeleton", "image_path")

    def __init__(self, backbone: nn.Module, head: nn.Module, optimizer: Callable, num_classes: int,
                 scheduler: Optional[Callable] = None, weight_decay: float = 0.0, coco_gt: Any = None,
                 flip_indices: Optional[Sequence[int]] = None, sigmas: Optional[Sequence[float]] = None,
                 skeleton: Optional[Sequence[Sequence[int]]] = None,
                 image_path: Optional[Callable[[int], Path]] = None, flip_test: bool = True, shift_heatmap: bool = True,
                 score_threshold: float = 0.2, nms_threshold: Optional[float] = 0.9,
                 decay_all_parameters: bool = False, num_overlays: int = 4, overlay_score: float = 0.3,
                 compile: bool = False) -> None:
        super().__init__(backbone, head, optimizer, scheduler, weight_decay)
        self.coco_gt, self.image_path = coco_gt, image_path
        self.flip_indices = tuple(int(i) for i in (flip_indices if flip_indices is not None else COCO_FLIP_INDICES))
        self.sigmas = None if sigmas is None else tuple(float(s) for s in sigmas)
        self.skeleton = tuple((int(a), int(b)) for a, b in skeleton or ())
        self.save_hyperparameters(ignore=["backbone", "head", "optimizer", "scheduler", "coco_gt", "image_path",
                                          "flip_indices", "sigmas", "skeleton"], logger=False)
        self.predictions: dict[str, list[dict]] = {"val": [], "test": []}

    def forward(self, images: Tensor) -> Tensor:
        """Heatmaps ``(B, K, h, w)`` of person crops."""
        return self.head(self.backbone(images))

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        if self.hparams.decay_all_parameters:
            return [{"params": [p for p in self.parameters() if p.requires_grad], "weight_decay": weight_decay}]
        return super().parameter_groups(weight_decay)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        heatmaps = self(batch["image"])
        if heatmaps.shape != batch["heatmaps"].shape:
            raise ValueError(f"PoseTask: the head gives heatmaps of shape {tuple(heatmaps.shape)} but the targets "
                             f"are {tuple(batch['heatmaps'].shape)}; head.output_stride must equal the "
                             f"datamodule's heatmap_stride and num_classes its keypoints")
        loss = keypoint_mse_loss(heatmaps, batch["heatmaps"], batch["weights"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(heatmaps))
        return loss

    def predict_heatmaps(self, images: Tensor) -> Tensor:
        """Heatmaps with the flip test when enabled."""
        heatmaps = self(images).float()
        if self.hparams.flip_test:
            mirrored = flip_back(self(images.flip(-1)).float(), list(self.flip_indices), self.hparams.shift_heatmap)
            heatmaps = (heatmaps + mirrored) * 0.5
        return heatmaps

    def predict_keypoints(self, images: Tensor, center: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        """Image-space keypoints ``(B, K, 2)`` and their scores ``(B, K)`` for crops of the given boxes."""
        heatmaps = self.predict_heatmaps(images)
        input_size = images.shape[-2:]
        stride = (input_size[1] / heatmaps.shape[-1], input_size[0] / heatmaps.shape[-2])
        keypoints, scores = decode_heatmaps(heatmaps, stride)
        return to_image(keypoints, center.float(), scale.float(), input_size), scores

    def _evaluate(self, batch: dict, stage: str) -> None:
        keypoints, scores = self.predict_keypoints(batch["image"], batch["center"], batch["scale"])
        areas = batch["scale"].float().prod(dim=-1)
        for i in range(len(keypoints)):
            self.predictions[stage].append({
                "key": int(batch["key"][i]), "image_id": int(batch["image_id"][i]),
                "keypoints": keypoints[i].cpu().numpy(), "keypoint_scores": scores[i].cpu().numpy(),
                "box_score": float(batch["score"][i]), "area": float(areas[i])})

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self.predictions["val"] = []

    def on_test_epoch_start(self) -> None:
        self.predictions["test"] = []

    def _gathered(self, stage: str) -> list[dict]:
        """Every process's predictions, in rank order (the evaluation loaders shard the set without repeats)."""
        predictions = self.predictions[stage]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Optional[list[dict]]] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, predictions)
            predictions = [p for part in gathered for p in part]
        return predictions

    def evaluation_epoch_end(self, stage: str) -> None:
        predictions = self._gathered(stage)
        self.predictions[stage] = []
        if not predictions:
            return
        coco_gt = self.coco_gt
        if coco_gt is None:
            raise RuntimeError("PoseTask: evaluation needs the ground truth: build the task with coco_gt= (run.py "
                               "passes datamodules.COCOKeypointsDataModule's coco_gt)")
        results = select_instances(predictions, list(self.sigmas) if self.sigmas else coco_sigmas(),
                                   self.hparams.score_threshold, self.hparams.nms_threshold)
        # A sanity check sees a few batches: evaluate on their images only, so the numbers mean something.
        image_ids = {int(p["image_id"]) for p in predictions} if self.trainer.sanity_checking else None
        stats = coco_keypoint_stats(coco_gt, results, image_ids)
        for name, value in stats.items():
            self.log(f"{stage}/{name}", value, sync_dist=False, prog_bar=name == "AP")
        if self.trainer.sanity_checking or self.global_rank != 0:
            return
        directory = Path(self.trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"keypoints_{stage}.json").write_text(json.dumps(results))
        log.info("%s keypoint AP %.4f (AP50 %.4f, AP75 %.4f, AR %.4f) over %d instances", stage, stats["AP"],
                 stats["AP_50"], stats["AP_75"], stats["AR"], len(results))
        if stage == "val":
            self._save_overlays(results, coco_gt)

    def _save_overlays(self, results: list[dict], coco_gt: Any) -> None:
        """Image | predicted skeletons (yellow) | ground-truth skeletons (green), for the first images."""
        image_path = self.image_path
        if not self.hparams.num_overlays or image_path is None:
            return
        from torchvision.io import ImageReadMode, decode_image
        from torchvision.utils import save_image

        skeleton = list(self.skeleton)
        directory = Path(self.trainer.default_root_dir) / "overlays"
        directory.mkdir(parents=True, exist_ok=True)
        image_ids = sorted({r["image_id"] for r in results})[: self.hparams.num_overlays]
        for number, image_id in enumerate(image_ids):
            image = decode_image(str(image_path(image_id)), mode=ImageReadMode.RGB)
            mine = [r["keypoints"] for r in results if r["image_id"] == image_id]
            predicted = torch.tensor(mine, dtype=torch.float32).view(len(mine), -1, 3)
            truth = torch.tensor([a["keypoints"] for a in coco_gt.imgToAnns.get(image_id, [])
                                  if a.get("num_keypoints", 1) > 0 and "keypoints" in a], dtype=torch.float32)
            truth = truth.view(len(truth), -1, 3)
            panels = [image,
                      draw_poses(image, predicted[..., :2], predicted[..., 2] >= self.hparams.overlay_score,
                                 skeleton, "yellow"),
                      draw_poses(image, truth[..., :2], truth[..., 2] > 0, skeleton, "lime")]
            save_image(torch.cat(panels, dim=-1).float() / 255,
                       directory / f"val_epoch{self.current_epoch:03d}_{number}.png")
