"""Box-to-box matching by IoU (e.g. attaching attributes to detected objects)."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from .boxes import as_boxes, box_iou

__all__ = ["match_boxes", "unmatched"]


def match_boxes(
    query: ArrayLike, candidates: ArrayLike, iou_threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Best candidate for each query box.

    Matching is independent per query (no one-to-one constraint): several
    queries may pick the same candidate.

    Arguments:
      query: (N, 4) float xyxy.
      candidates: (M, 4) float xyxy.
      iou_threshold: a match is accepted when its IoU is >= this.

    Returns:
      idx: (N,) int64 index of the best candidate, -1 when the best IoU is below
        the threshold or there are no candidates. Ties go to the lowest index.
      best_iou: (N,) float64 best IoU found, reported even when rejected (0 when
        M == 0).
    """
    q = as_boxes(query, "query")
    c = as_boxes(candidates, "candidates")
    n = q.shape[0]
    if c.shape[0] == 0:
        return np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.float64)
    iou = box_iou(q, c)
    idx = iou.argmax(axis=1).astype(np.int64)  # argmax returns the first maximum
    best = iou[np.arange(n), idx]
    idx[best < iou_threshold] = -1
    return idx, best


def unmatched(query: ArrayLike, candidates: ArrayLike, iou_threshold: float) -> np.ndarray:
    """Candidates that no query box overlaps with IoU >= ``iou_threshold``.

    Used to find "floating" attributes that could not be attached to any object.

    Arguments:
      query: (N, 4) float xyxy.
      candidates: (M, 4) float xyxy.

    Returns:
      (M,) bool, True for unmatched candidates (all True when N == 0).
    """
    q = as_boxes(query, "query")
    c = as_boxes(candidates, "candidates")
    if q.shape[0] == 0:
        return np.ones(c.shape[0], dtype=bool)
    return ~np.asarray((box_iou(q, c) >= iou_threshold).any(axis=0))


def fraction_inside(masks: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Share of each mask's pixels that lie inside its paired box.

    Args:
        masks: (N, H, W) bool.
        boxes: (N, 4) float xyxy, pixel edges; box i is paired with mask i.

    Returns:
        (N,) float64 in [0, 1]; 0 for an empty mask.
    """
    masks = np.asarray(masks, dtype=bool)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if masks.shape[0] != boxes.shape[0]:
        raise ValueError(f"{masks.shape[0]} masks but {boxes.shape[0]} boxes")
    height, width = masks.shape[1:]
    # Pixel (y, x) covers [x, x+1) x [y, y+1); count it inside when its centre is.
    xs = np.arange(width) + 0.5
    ys = np.arange(height) + 0.5
    in_x = (xs[None, :] >= boxes[:, 0:1]) & (xs[None, :] <= boxes[:, 2:3])  # (N, W)
    in_y = (ys[None, :] >= boxes[:, 1:2]) & (ys[None, :] <= boxes[:, 3:4])  # (N, H)
    inside = np.einsum("nhw,nh,nw->n", masks, in_y, in_x, dtype=np.int64, optimize=True)
    total = masks.reshape(masks.shape[0], -1).sum(axis=1)
    return np.where(total > 0, inside / np.maximum(total, 1), 0.0)
