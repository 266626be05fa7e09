"""Top-down pose post-processing and COCO keypoint evaluation, as mmpose 1.x does them for HRVMamba.

- Decoding (``MSRAHeatmap.decode``): each heatmap's arg-max, moved a quarter pixel towards the higher
  neighbour in x and in y (mmpose's bounds: x in (1, w - 1) for the x step, y in (1, h - 1) for the y
  step), times the heatmap stride; the maximum is the keypoint score (location -1 where it is <= 0).
- Flip test: the heatmaps of the mirrored crop, mirrored back with left/right channels swapped and
  shifted one pixel right (``shift_heatmap``), averaged with the plain ones.
- Back to the image: ``p / input_size * scale + center - scale / 2`` (no rotation at test time).
- Scoring (``CocoMetric``, ``score_mode='bbox_keypoint'``): box score x the mean of the keypoint scores
  above 0.2; then OKS-NMS per image at OKS 0.9, with each instance's area the crop box's area.
- COCO keypoint AP/AR by pycocotools' ``COCOeval(iouType='keypoints')`` on the kept instances.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections import defaultdict
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger("mambalab")

# COCOeval's ``stats`` for keypoints, in order, as logged (mmpose names them AP, AP .5, ..., AR (L)).
KEYPOINT_STATS = ("AP", "AP_50", "AP_75", "AP_M", "AP_L", "AR", "AR_50", "AR_75", "AR_M", "AR_L")


def flip_back(heatmaps: Tensor, flip_indices: Sequence[int], shift: bool = True) -> Tensor:
    """Heatmaps of a mirrored crop in the unmirrored crop's frame (left/right channels swapped); with
    ``shift`` moved one pixel right, which centres them on the plain heatmaps (mmpose's shift_heatmap)."""
    heatmaps = heatmaps.flip(-1)[:, list(flip_indices)]
    if shift:
        heatmaps = torch.cat([heatmaps[..., :1], heatmaps[..., :-1]], dim=-1)
    return heatmaps


def decode_heatmaps(heatmaps: Tensor, stride: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Keypoints ``(B, K, 2)`` in input pixels (x, y) and scores ``(B, K)`` from heatmaps ``(B, K, h, w)``;
    ``stride`` is (x, y) input pixels per heatmap pixel (module docstring)."""
    batch, joints, height, width = heatmaps.shape
    flat = heatmaps.reshape(batch, joints, -1)
    scores, index = flat.max(dim=-1)
    x, y = index % width, torch.div(index, width, rounding_mode="floor")
    maps = heatmaps.reshape(batch * joints, height, width)
    rows = torch.arange(batch * joints, device=heatmaps.device)
    xf, yf = x.reshape(-1), y.reshape(-1)
    inside_x = (xf > 1) & (xf < width - 1) & (yf > 0) & (yf < height)
    inside_y = (yf > 1) & (yf < height - 1) & (xf > 0) & (xf < width)
    dx = maps[rows, yf, (xf + 1).clamp(max=width - 1)] - maps[rows, yf, (xf - 1).clamp(min=0)]
    dy = maps[rows, (yf + 1).clamp(max=height - 1), xf] - maps[rows, (yf - 1).clamp(min=0), xf]
    keypoints = torch.stack([x, y], dim=-1).to(heatmaps.dtype)
    keypoints = keypoints + 0.25 * torch.stack([torch.where(inside_x, dx.sign(), torch.zeros_like(dx)),
                                                torch.where(inside_y, dy.sign(), torch.zeros_like(dy))],
                                               dim=-1).reshape(batch, joints, 2)
    keypoints = torch.where((scores > 0)[..., None], keypoints, torch.full_like(keypoints, -1.0))
    return keypoints * keypoints.new_tensor(list(stride)), scores


def to_image(keypoints: Tensor, center: Tensor, scale: Tensor, input_size: Sequence[int]) -> Tensor:
    """Crop keypoints ``(B, K, 2)`` back to image pixels; ``input_size`` is the crop's (height, width)."""
    height, width = input_size
    size = keypoints.new_tensor([width, height])
    return keypoints / size * scale[:, None] + center[:, None] - 0.5 * scale[:, None]


def instance_score(keypoint_scores: np.ndarray, box_score: float, threshold: float = 0.2) -> float:
    """Box score x the mean keypoint score over keypoints scoring above ``threshold`` (0 if none does)."""
    confident = keypoint_scores[keypoint_scores > threshold]
    return float(box_score * confident.mean()) if confident.size else 0.0


def oks(reference: np.ndarray, others: np.ndarray, area_reference: float, area_others: np.ndarray,
        sigmas: np.ndarray) -> np.ndarray:
    """Object keypoint similarity of one pose ``(K, 2)`` with each of ``others`` ``(N, K, 2)``, the scale
    being the mean of the two areas (mmpose's ``oks_iou`` without a visibility threshold)."""
    variances = (2 * sigmas) ** 2
    squared = ((others - reference[None]) ** 2).sum(-1)
    scale = (area_reference + area_others)[:, None] / 2 + np.spacing(1)
    return np.exp(-squared / variances[None] / scale / 2).mean(-1)


def oks_nms(poses: np.ndarray, scores: np.ndarray, areas: np.ndarray, sigmas: np.ndarray,
            threshold: float = 0.9) -> list[int]:
    """Indices kept by greedy OKS non-maximum suppression: best score first, dropping every remaining
    pose whose OKS with a kept one exceeds ``threshold``."""
    order = list(np.argsort(-scores, kind="stable"))
    keep = []
    while order:
        best, order = order[0], order[1:]
        keep.append(int(best))
        if order:
            overlap = oks(poses[best], poses[order], areas[best], areas[order], sigmas)
            order = [i for i, value in zip(order, overlap) if value <= threshold]
    return keep


def select_instances(predictions: Sequence[dict], sigmas: Sequence[float], score_threshold: float = 0.2,
                     nms_threshold: Optional[float] = 0.9) -> list[dict]:
    """COCO keypoint results (``image_id``, ``category_id``, ``keypoints`` as x, y, score triples, ``score``)
    from per-instance predictions (``key``, ``image_id``, ``keypoints`` (K, 2), ``keypoint_scores`` (K,),
    ``box_score``, ``area``): duplicates of a key dropped, rescored, OKS-NMS per image (None: no NMS)."""
    unique = {int(p["key"]): p for p in predictions}
    by_image: dict[int, list[dict]] = defaultdict(list)
    for key in sorted(unique):
        by_image[int(unique[key]["image_id"])].append(unique[key])
    sigmas = np.asarray(sigmas, dtype=np.float64)
    results = []
    for image_id in sorted(by_image):
        people = by_image[image_id]
        poses = np.stack([np.asarray(p["keypoints"], dtype=np.float64) for p in people])
        keypoint_scores = np.stack([np.asarray(p["keypoint_scores"], dtype=np.float64) for p in people])
        scores = np.array([instance_score(s, float(p["box_score"]), score_threshold)
                           for s, p in zip(keypoint_scores, people)])
        areas = np.array([float(p["area"]) for p in people])
        keep = (oks_nms(poses, scores, areas, sigmas, nms_threshold) if nms_threshold is not None
                else list(range(len(people))))
        for i in keep:
            triples = np.concatenate([poses[i], keypoint_scores[i][:, None]], axis=1)
            results.append({"image_id": image_id, "category_id": int(people[i].get("category_id", 1)),
                            "keypoints": triples.reshape(-1).tolist(), "score": float(scores[i])})
    return results


def coco_sigmas() -> list[float]:
    """The per-keypoint OKS constants of COCO's 17 keypoints, as pycocotools evaluates them."""
    from pycocotools.cocoeval import Params

    return [float(s) for s in Params(iouType="keypoints").kpt_oks_sigmas]


def coco_keypoint_stats(coco_gt: Any, results: Sequence[dict], image_ids: Optional[Sequence[int]] = None
                        ) -> dict[str, float]:
    """``KEYPOINT_STATS`` from pycocotools' keypoint evaluation of ``results`` against ``coco_gt`` (all its
    images, or ``image_ids``); every stat is 0 when there is no result."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {name: 0.0 for name in KEYPOINT_STATS}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        coco_dt = coco_gt.loadRes([dict(r) for r in results])
        evaluator = COCOeval(coco_gt, coco_dt, iouType="keypoints")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    log.debug("%s", printed.getvalue())
    return {name: float(value) for name, value in zip(KEYPOINT_STATS, evaluator.stats)}
