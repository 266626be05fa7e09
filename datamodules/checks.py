"""Checks on labels and boxes where they enter, so a bad value is blamed on its file, not on a later reshape.

``check_labels`` refuses class labels outside ``0..num_classes - 1`` (an ``ignore_index`` excepted), naming
the source and the values. ``BoxReport`` sorts a dataset's boxes into usable, degenerate and outside-the-image
ones and says once per dataset what was dropped, and when nothing usable is left.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

log = logging.getLogger("mambalab")
SHOWN_VALUES = 8


def check_labels(labels: Union[np.ndarray, Tensor], num_classes: int, source: object,
                 ignore_index: Optional[int] = None, meaning: str = "") -> None:
    """Raise ``ValueError`` naming ``source`` (a file, or a file and an index) when a label lies outside
    ``0..num_classes - 1`` and is not ``ignore_index``; the message lists the bad values and where the first is.
    ``meaning`` (e.g. " (0 unlabelled, 1..150 classes)") follows the valid range in the message."""
    values = labels.numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if values.size == 0 or (values.min() >= 0 and values.max() < num_classes):
        return
    bad = (values < 0) | (values >= num_classes)
    if ignore_index is not None:
        bad &= values != ignore_index
    if not bad.any():
        return
    found = [v.item() for v in np.unique(values[bad])]
    shown = ", ".join(str(v) for v in found[:SHOWN_VALUES]) + (", ..." if len(found) > SHOWN_VALUES else "")
    first = np.unravel_index(int(np.argmax(bad.reshape(-1))), values.shape)
    where = first[0] if len(first) == 1 else tuple(int(i) for i in first)
    allowed = f"0..{num_classes - 1}" + (f" or {ignore_index} (ignored)" if ignore_index is not None else "")
    raise ValueError(f"{source}: label value(s) {shown} outside {allowed}{meaning}: {int(bad.sum())} of "
                     f"{values.size} labels, the first at index {where}")


@dataclass
class BoxReport:
    """The boxes of one dataset, counted by what happens to them.

    Degenerate boxes (under 1 pixel wide or high, or not finite) and boxes with no pixel inside their image
    are dropped; boxes reaching more than ``margin`` pixels beyond the image border are kept as annotated
    (COCO's evaluation reads them so) but counted. Kept boxes that are not scored (COCO's crowd regions) are
    counted apart. ``report`` logs the faults once, and warns when no scored box is left: detection metrics
    on such a set are undefined.
    """

    dataset: str
    margin: float = 1.0
    usable: int = 0
    unscored: int = 0
    degenerate: int = 0
    outside: int = 0
    beyond_border: int = 0

    def keep(self, boxes: np.ndarray, height: int, width: int, scored: Optional[np.ndarray] = None) -> np.ndarray:
        """Boolean mask of the usable ``(N, 4)`` boxes, given as COCO's ``(x, y, width, height)``, of an image
        ``height x width``; counts all of them. ``scored`` marks the boxes evaluation scores (default all)."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        x1, y1, box_w, box_h = boxes.T
        with np.errstate(invalid="ignore"):
            x2, y2 = x1 + box_w, y1 + box_h
            degenerate = ~np.isfinite(boxes).all(-1) | ~(box_w >= 1) | ~(box_h >= 1)
            inside_w = np.minimum(x2, width) - np.maximum(x1, 0)
            inside_h = np.minimum(y2, height) - np.maximum(y1, 0)
            outside = ~degenerate & ((inside_w < 1) | (inside_h < 1))
            beyond = ~degenerate & ~outside & ((x1 < -self.margin) | (y1 < -self.margin)
                                               | (x2 > width + self.margin) | (y2 > height + self.margin))
        keep = ~degenerate & ~outside
        scored = np.ones_like(keep) if scored is None else np.asarray(scored, dtype=bool)
        self.usable += int((keep & scored).sum())
        self.unscored += int((keep & ~scored).sum())
        self.degenerate += int(degenerate.sum())
        self.outside += int(outside.sum())
        self.beyond_border += int(beyond.sum())
        return keep

    @rank_zero_only
    def report(self) -> None:
        """Log what was dropped or is suspicious, and whether anything usable is left."""
        total = self.usable + self.unscored + self.degenerate + self.outside
        if self.degenerate or self.outside:
            log.warning("%s: %d of %d boxes dropped: %d degenerate (under 1 px wide or high, or not finite), "
                        "%d wholly outside their image", self.dataset, self.degenerate + self.outside, total,
                        self.degenerate, self.outside)
        if self.beyond_border:
            log.warning("%s: %d boxes reach more than %g px beyond their image border (kept as annotated)",
                        self.dataset, self.beyond_border, self.margin)
        if not self.usable:
            log.warning("%s: no usable box (%d annotated, %d of them unscored crowd regions): detection "
                        "metrics on this set are undefined", self.dataset, total, self.unscored)
