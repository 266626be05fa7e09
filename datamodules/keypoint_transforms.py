"""Top-down keypoint transforms: person boxes to affine crops, flip pairs, augmentation and heatmap targets.

These follow mmpose 1.x (the toolbox HRVMamba's pose results were trained and tested with, vendored as
mmpose 1.3.1 in zhanghao5201/HRVMamba), in our own code:

- A box becomes a ``center`` and a ``scale`` (its width and height times ``padding``, 1.25), and the scale
  is widened or heightened to the input's aspect ratio (``GetBBoxCenterScale``, ``TopdownAffine``).
- The crop is the similarity transform taking the (rotated) scale box onto the input: ``x -> s R(-rot)
  (x - center) + (w/2, h/2)`` with ``s = w / scale_w`` (mmpose's non-UDP ``get_warp_matrix``). Pixels are
  sampled bilinearly at integer pixel centres with zeros outside, as ``cv2.warpAffine``.
- Horizontal flips mirror about ``x -> W - 1 - x`` and swap left/right keypoints.
- Targets use the standard ("MSRA", SimpleBaseline/HRNet) encoding: for each labelled keypoint at ``p``
  (input pixels) an unnormalised Gaussian with peak 1 and ``sigma`` is drawn around the integer heatmap
  pixel ``floor(p / stride + 0.5)``, cut off at 3 sigma; overlapping Gaussians keep the maximum. A keypoint
  whose whole Gaussian window falls outside the heatmap gets weight 0 (not UDP: no sub-pixel centre).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def flip_indices_from_names(names: Sequence[str]) -> list[int]:
    """Index of each keypoint's mirror image: ``left_*`` <-> ``right_*``, the others map to themselves."""
    position = {name: i for i, name in enumerate(names)}
    flipped = []
    for name in names:
        mirror = (name.replace("left", "\0").replace("right", "left").replace("\0", "right")
                  if "left" in name or "right" in name else name)
        if mirror not in position:
            raise ValueError(f"keypoint {name!r} has no mirror keypoint {mirror!r} in {list(names)}")
        flipped.append(position[mirror])
    return flipped


def box_to_center_scale(box_xyxy: np.ndarray, padding: float = 1.25) -> tuple[np.ndarray, np.ndarray]:
    """Center and (padded) width/height of an ``(x1, y1, x2, y2)`` box."""
    box = np.asarray(box_xyxy, dtype=np.float32)
    return (box[:2] + box[2:]) * 0.5, (box[2:] - box[:2]) * padding


def fix_aspect_ratio(scale: np.ndarray, aspect_ratio: float) -> np.ndarray:
    """Grow the shorter side of a ``(w, h)`` scale so that ``w / h == aspect_ratio``."""
    width, height = float(scale[0]), float(scale[1])
    if width > height * aspect_ratio:
        return np.array([width, width / aspect_ratio], dtype=np.float32)
    return np.array([height * aspect_ratio, height], dtype=np.float32)


def crop_matrix(center: np.ndarray, scale: np.ndarray, rotation: float, output_size: Sequence[int]) -> np.ndarray:
    """The 2x3 affine map from image pixels to crop pixels (``output_size`` is (height, width)).

    The box of width ``scale[0]`` around ``center``, rotated by ``rotation`` degrees, fills the output width;
    heights follow by the same factor (a similarity transform, as mmpose's ``get_warp_matrix``).
    """
    out_h, out_w = output_size
    factor = out_w / float(scale[0])
    theta = np.deg2rad(rotation)
    cos, sin = np.cos(theta), np.sin(theta)
    linear = factor * np.array([[cos, sin], [-sin, cos]])
    offset = np.array([out_w * 0.5, out_h * 0.5]) - linear @ np.asarray(center, dtype=np.float64)
    return np.concatenate([linear, offset[:, None]], axis=1)


def horizontal_flip_matrix(width: int) -> np.ndarray:
    """The 2x3 map ``x -> width - 1 - x`` (mirroring an image ``width`` pixels wide)."""
    return np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0]])


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The 2x3 affine map ``outer(inner(x))``."""
    result = outer[:, :2] @ inner
    result[:, 2] += outer[:, 2]
    return result


def apply_affine(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``(..., 2)`` points through a 2x3 affine map."""
    return points @ matrix[:, :2].T + matrix[:, 2]


def warp_affine(image: Tensor, matrix: np.ndarray, output_size: Sequence[int]) -> Tensor:
    """``(C, H, W)`` float image resampled into ``output_size`` (height, width) through the 2x3 map
    ``matrix`` (image -> output): bilinear at integer pixel centres, zeros outside (``cv2.warpAffine``)."""
    out_h, out_w = output_size
    height, width = image.shape[-2:]
    inverse = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]
    ys, xs = np.meshgrid(np.arange(out_h, dtype=np.float64), np.arange(out_w, dtype=np.float64), indexing="ij")
    source = apply_affine(np.stack([xs, ys], axis=-1), inverse)
    grid = torch.from_numpy(source).float()
    grid[..., 0] = grid[..., 0] * 2 / max(width - 1, 1) - 1
    grid[..., 1] = grid[..., 1] * 2 / max(height - 1, 1) - 1
    return F.grid_sample(image[None].float(), grid[None], mode="bilinear", padding_mode="zeros",
                         align_corners=True)[0]


def gaussian_heatmaps(keypoints: np.ndarray, visible: np.ndarray, heatmap_size: Sequence[int], stride: float,
                      sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """The standard heatmap targets ``(K, h, w)`` and their weights ``(K,)`` (module docstring).

    Args:
        keypoints: ``(K, 2)`` positions in input pixels.
        visible: ``(K,)`` labels (> 0.5: labelled).
        heatmap_size: (height, width) of the heatmaps.
        stride: input pixels per heatmap pixel.
        sigma: Gaussian standard deviation in heatmap pixels.
    """
    height, width = heatmap_size
    heatmaps = np.zeros((len(keypoints), height, width), dtype=np.float32)
    weights = np.asarray(visible, dtype=np.float32).copy()
    radius = int(3 * sigma)
    offsets = np.arange(-radius, radius + 1, dtype=np.float32)
    window = np.exp(-(offsets[None, :] ** 2 + offsets[:, None] ** 2) / (2 * sigma ** 2))
    for k, (point, label) in enumerate(zip(keypoints, visible)):
        if label < 0.5:
            continue
        cx, cy = (np.asarray(point, dtype=np.float64) / stride + 0.5).astype(np.int64)
        x1, y1, x2, y2 = cx - radius, cy - radius, cx + radius + 1, cy + radius + 1
        if x1 >= width or y1 >= height or x2 < 0 or y2 < 0:
            weights[k] = 0.0
            continue
        hx1, hy1, hx2, hy2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
        region = heatmaps[k, hy1:hy2, hx1:hx2]
        np.maximum(region, window[hy1 - y1:hy2 - y1, hx1 - x1:hx2 - x1], out=region)
    return heatmaps, weights


def truncated_normal(rng: np.random.Generator, size: int) -> np.ndarray:
    """Standard normal samples restricted to [-1, 1] (redrawn until inside)."""
    values = rng.standard_normal(size)
    outside = np.abs(values) > 1
    while outside.any():
        values[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(values) > 1
    return values


def random_box_transform(rng: np.random.Generator, center: np.ndarray, scale: np.ndarray, shift_factor: float,
                         shift_prob: float, scale_range: Sequence[float], scale_prob: float, rotate_factor: float,
                         rotate_prob: float) -> tuple[np.ndarray, np.ndarray, float]:
    """mmpose's ``RandomBBoxTransform``: with their probabilities, shift the center by up to
    ``shift_factor`` x scale, rescale by a factor in ``scale_range`` and rotate by up to ``rotate_factor``
    degrees, each drawn from a normal truncated to one standard deviation."""
    shift_x, shift_y, resize, turn = truncated_normal(rng, 4)
    shift = np.array([shift_x, shift_y]) * shift_factor if rng.random() < shift_prob else np.zeros(2)
    low, high = scale_range
    factor = resize * (high - low) / 2 + (high + low) / 2 if rng.random() < scale_prob else 1.0
    rotation = float(turn * rotate_factor) if rng.random() < rotate_prob else 0.0
    return (center + shift * scale).astype(np.float32), (scale * factor).astype(np.float32), rotation


def half_body_box(rng: np.random.Generator, keypoints: np.ndarray, visible: np.ndarray, upper_body: Sequence[int],
                  lower_body: Sequence[int], prob: float = 0.3, min_total: int = 9, min_upper: int = 2,
                  min_lower: int = 3, upper_first_prob: float = 0.7, padding: float = 1.5
                  ) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """mmpose's ``RandomHalfBody``: with probability ``prob`` (and at least ``min_total`` labelled keypoints),
    a center and scale around the labelled upper- or lower-body keypoints only; None otherwise."""
    if (visible > 0).sum() < min_total or rng.random() > prob:
        return None
    upper = [i for i in upper_body if visible[i] > 0]
    lower = [i for i in lower_body if visible[i] > 0]
    prefer_upper = rng.random() < upper_first_prob
    if len(upper) < min_upper and len(lower) < min_lower:
        return None
    if len(lower) < min_lower:
        chosen = upper
    elif len(upper) < min_upper:
        chosen = lower
    else:
        chosen = upper if prefer_upper else lower
    points = keypoints[chosen]
    low, high = points.min(axis=0), points.max(axis=0)
    return points.mean(axis=0).astype(np.float32), ((high - low) * padding).astype(np.float32)
