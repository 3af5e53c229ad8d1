"""Axis-aligned box kernels: format conversion, area, IoU, NMS, filtering.

All functions are pure numpy and return new arrays (inputs are never modified).
Boxes are in continuous pixel coordinates with no "+1" convention, matching
``torchvision.ops``: a box ``[x1, y1, x2, y2]`` has area ``(x2 - x1) * (y2 - y1)``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "as_boxes",
    "box_area",
    "box_contains",
    "box_iou",
    "clip_boxes",
    "nms",
    "nms_from_iou",
    "score_filter",
    "xywh_to_xyxy",
    "xyxy_to_xywh",
]


def as_boxes(boxes: ArrayLike, name: str = "boxes") -> np.ndarray:
    """Validate and convert an array-like of boxes.

    Arguments:
      boxes: (N, 4) array-like. An empty sequence is accepted as (0, 4).
      name: used in the error message.

    Returns:
      (N, 4) float64 array (a copy when a dtype conversion is needed).
    """
    arr = np.asarray(boxes, dtype=np.float64)
    # An empty Python list becomes shape (0,); treat it as "no boxes" rather than an error.
    if arr.size == 0:
        return arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{name} must have shape (N, 4), got {arr.shape}")
    return arr


def xywh_to_xyxy(boxes: ArrayLike) -> np.ndarray:
    """Convert ``[x, y, w, h]`` boxes to ``[x1, y1, x2, y2]``.

    Arguments:
      boxes: (N, 4) float xywh.

    Returns:
      (N, 4) float64 xyxy.
    """
    b = as_boxes(boxes)
    out = b.copy()
    out[:, 2:] = b[:, :2] + b[:, 2:]
    return out


def xyxy_to_xywh(boxes: ArrayLike) -> np.ndarray:
    """Convert ``[x1, y1, x2, y2]`` boxes to ``[x, y, w, h]``.

    Arguments:
      boxes: (N, 4) float xyxy.

    Returns:
      (N, 4) float64 xywh (w, h may be negative for inverted boxes).
    """
    b = as_boxes(boxes)
    out = b.copy()
    out[:, 2:] = b[:, 2:] - b[:, :2]
    return out


def box_area(boxes: ArrayLike) -> np.ndarray:
    """Area of each box.

    Arguments:
      boxes: (N, 4) float xyxy.

    Returns:
      (N,) float64. Degenerate boxes (x2 <= x1 or y2 <= y1) have area 0;
      unlike torchvision we clamp, so an inverted box never has negative area.
    """
    b = as_boxes(boxes)
    wh = np.clip(b[:, 2:] - b[:, :2], 0.0, None)
    return wh[:, 0] * wh[:, 1]


def box_contains(outer: ArrayLike, inner: ArrayLike, tolerance: float = 1.0) -> np.ndarray:
    """Whether each ``outer`` box contains its paired ``inner`` box, within ``tolerance`` pixels.

    The tolerance forgives rounding: stored boxes are rounded to 2 decimals, and a box grounded
    inside another may poke out by a fraction of a pixel.

    Arguments:
      outer, inner: (..., 4) float xyxy, broadcast against each other; (4,) for one pair.
      tolerance: pixels ``inner`` may extend past ``outer`` on each side.

    Returns:
      (...) bool; a 0-d array for one pair (usable as a truth value).
    """
    o = np.asarray(outer, dtype=np.float64)
    i = np.asarray(inner, dtype=np.float64)
    if o.shape[-1:] != (4,) or i.shape[-1:] != (4,):
        raise ValueError(f"boxes must have shape (..., 4), got {o.shape} and {i.shape}")
    starts = (o[..., :2] <= i[..., :2] + tolerance).all(axis=-1)
    ends = (o[..., 2:] >= i[..., 2:] - tolerance).all(axis=-1)
    return np.asarray(starts & ends)


def box_iou(boxes_a: ArrayLike, boxes_b: ArrayLike) -> np.ndarray:
    """Pairwise intersection-over-union.

    Arguments:
      boxes_a: (N, 4) float xyxy.
      boxes_b: (M, 4) float xyxy.

    Returns:
      (N, M) float64 IoU, equal to ``torchvision.ops.box_iou`` wherever that is
      finite. Pairs whose union is 0 (two empty boxes) get IoU 0 instead of NaN.
      N == 0 or M == 0 gives an empty (N, M) array.
    """
    a = as_boxes(boxes_a, "boxes_a")
    b = as_boxes(boxes_b, "boxes_b")
    area_a = box_area(a)
    area_b = box_area(b)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])  # (N, M, 2)
    wh = np.clip(rb - lt, 0.0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    out = np.zeros_like(inter)
    # Division only where the union is positive; everything else stays 0 (no NaN warnings).
    np.divide(inter, union, out=out, where=union > 0)
    return out


def nms_from_iou(iou: ArrayLike, scores: ArrayLike, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression given a precomputed pairwise IoU matrix.

    Shared by box NMS and mask NMS so both follow the same rule: visit items by
    descending score, keep an item unless an already-kept item has
    IoU > ``iou_threshold`` with it.

    Arguments:
      iou: (N, N) float pairwise IoU (symmetric).
      scores: (N,) float.
      iou_threshold: suppress when IoU is strictly greater than this.

    Returns:
      (K,) int64 indices of kept items, in descending score order. Equal
      scores are visited lower index first.
    """
    iou = np.asarray(iou, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = s.shape[0]
    if iou.shape != (n, n):
        raise ValueError(f"iou must have shape ({n}, {n}), got {iou.shape}")
    order = np.argsort(-s, kind="stable")
    suppressed = np.zeros(n, dtype=bool)
    keep: list[int] = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(int(i))
        # One vectorised row update per kept item; suppressed items never suppress others.
        suppressed |= iou[i] > iou_threshold
    return np.asarray(keep, dtype=np.int64)


def nms(boxes: ArrayLike, scores: ArrayLike, iou_threshold: float) -> np.ndarray:
    """Class-agnostic greedy NMS, same result as ``torchvision.ops.nms``.

    Arguments:
      boxes: (N, 4) float xyxy.
      scores: (N,) float.
      iou_threshold: a box is discarded when its IoU with a higher-scoring kept
        box is strictly greater than this.

    Returns:
      (K,) int64 kept indices sorted by descending score (ties: lower index first).

    Memory is O(N^2) for the IoU matrix, which is fine for per-image detector
    outputs (a few thousand boxes at most).
    """
    b = as_boxes(boxes)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.shape[0] != b.shape[0]:
        raise ValueError(f"got {b.shape[0]} boxes but {s.shape[0]} scores")
    if b.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    return nms_from_iou(box_iou(b, b), s, iou_threshold)


def score_filter(scores: ArrayLike, threshold: float) -> np.ndarray:
    """Indices of scores at or above a threshold.

    Arguments:
      scores: (N,) float.
      threshold: inclusive lower bound.

    Returns:
      (K,) int64 indices in ascending order.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    return np.flatnonzero(s >= threshold).astype(np.int64)


def clip_boxes(boxes: ArrayLike, height: float, width: float) -> np.ndarray:
    """Clip boxes to the image rectangle ``[0, width] x [0, height]``.

    Arguments:
      boxes: (N, 4) float xyxy.
      height, width: image size in pixels.

    Returns:
      (N, 4) float64 clipped copy.
    """
    b = as_boxes(boxes).copy()
    b[:, 0::2] = np.clip(b[:, 0::2], 0.0, float(width))
    b[:, 1::2] = np.clip(b[:, 1::2], 0.0, float(height))
    return b
