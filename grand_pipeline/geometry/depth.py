"""Per-object depth statistics, depth layers and spatial proximity groups.

Depth maps come from monocular estimators that output relative inverse depth
(larger = nearer), so values are only comparable within one image; everything
here normalises per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from .boxes import as_boxes

__all__ = [
    "LAYER_NAMES",
    "UNKNOWN_LAYER",
    "depth_layers",
    "median_in_masks",
    "normalise_depth",
    "proximity_groups",
]

LAYER_NAMES = ("immediate foreground", "foreground", "midground", "background")
UNKNOWN_LAYER = "unknown"


def median_in_masks(depth: ArrayLike, masks: ArrayLike) -> np.ndarray:
    """Median depth inside each mask.

    Arguments:
      depth: (H, W) float depth map. NaNs inside a mask propagate (np.median).
      masks: (N, H, W) bool (nonzero is inside).

    Returns:
      (N,) float64 median; NaN for empty masks.

    The depth map is flattened once; each mask gathers only its own pixels, so
    no per-mask copy of the full map is made.
    """
    d = np.asarray(depth, dtype=np.float64)
    m = np.asarray(masks)
    if d.ndim != 2:
        raise ValueError(f"depth must have shape (H, W), got {d.shape}")
    if m.ndim != 3 or m.shape[1:] != d.shape:
        raise ValueError(f"masks must have shape (N, {d.shape[0]}, {d.shape[1]}), got {m.shape}")
    flat = d.reshape(-1)
    mflat = (m != 0).reshape(m.shape[0], flat.size)
    out = np.full(m.shape[0], np.nan, dtype=np.float64)
    for i, row in enumerate(mflat):
        vals = flat[row]
        if vals.size:
            out[i] = np.median(vals)
    return out


def normalise_depth(values: ArrayLike) -> np.ndarray:
    """Normalise one image's per-object depths to [0, 1] with 0 = nearest.

    ``n = 1 - (d - min) / (max - min)`` over the non-NaN values, where a larger
    input means nearer (inverse depth). If all values are equal the result is
    0.5; NaN stays NaN.

    Arguments:
      values: (N,) float.

    Returns:
      (N,) float64.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    out = np.full(v.shape, np.nan)
    ok = ~np.isnan(v)
    if not ok.any():
        return out
    lo, hi = v[ok].min(), v[ok].max()
    if hi > lo:
        out[ok] = 1.0 - (v[ok] - lo) / (hi - lo)
    else:
        out[ok] = 0.5
    return out


def depth_layers(normalised: ArrayLike, thresholds: tuple[float, ...] = (0.1, 0.6, 0.85)) -> list[str]:
    """Name the depth layer of each object.

    Arguments:
      normalised: (N,) float from :func:`normalise_depth` (0 = nearest).
      thresholds: exclusive upper bounds of "immediate foreground",
        "foreground" and "midground"; anything else is "background".

    Returns:
      N layer names; NaN gives "unknown".
    """
    v = np.asarray(normalised, dtype=np.float64).reshape(-1)
    if len(thresholds) != 3 or list(thresholds) != sorted(thresholds):
        raise ValueError(f"thresholds must be three ascending values, got {thresholds}")
    # searchsorted(side="right") counts thresholds <= v, i.e. the first layer with v < t.
    which = np.searchsorted(np.asarray(thresholds, dtype=np.float64), v, side="right")
    return [UNKNOWN_LAYER if np.isnan(x) else LAYER_NAMES[k] for x, k in zip(v, which, strict=True)]


def proximity_groups(
    boxes: ArrayLike,
    layers: Sequence[str],
    image_size: tuple[int, int],
    radius_frac: float = 0.2,
) -> np.ndarray:
    """Cluster nearby objects that lie in the same depth layer.

    Greedy single-seed clustering in box order: an unassigned object becomes a
    seed, and every unassigned object with the same layer name (including
    "unknown") whose box centre is within ``radius_frac * diagonal`` (inclusive)
    of the seed's centre joins its group. Members are compared with the seed
    only, so groups do not chain.

    Arguments:
      boxes: (N, 4) float xyxy.
      layers: N layer names, e.g. from :func:`depth_layers`.
      image_size: (H, W) in pixels.
      radius_frac: radius as a fraction of the image diagonal.

    Returns:
      (N,) int64 group ids, consecutive from 0 in creation (seed) order.
    """
    b = as_boxes(boxes)
    n = b.shape[0]
    if len(layers) != n:
        raise ValueError(f"got {n} boxes but {len(layers)} layers")
    h, w = image_size
    radius = radius_frac * float(np.hypot(h, w))
    centres = (b[:, :2] + b[:, 2:]) / 2.0
    dist = np.linalg.norm(centres[:, None, :] - centres[None, :, :], axis=-1)  # (N, N)
    _, codes = np.unique(np.asarray(list(layers), dtype=str), return_inverse=True)
    codes = codes.reshape(-1)
    near = (dist <= radius) & (codes[:, None] == codes[None, :])
    group = np.full(n, -1, dtype=np.int64)
    next_id = 0
    for seed in range(n):
        if group[seed] >= 0:
            continue
        group[near[seed] & (group < 0)] = next_id
        group[seed] = next_id  # explicit: a NaN centre is not "near" itself
        next_id += 1
    return group
