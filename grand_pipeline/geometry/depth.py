"""Per-object depth statistics, depth layers and spatial proximity groups.

Depth maps come from monocular estimators that output relative inverse depth
(larger = nearer), so values are only comparable within one image; everything
here normalises per image.

A low-resolution copy of the map (``area_mean`` on a ``grid_size`` grid) travels with the rows
so that objects made after level 1 still get a depth (``lowres_depths``). Grid cells are
integer-aligned bins of the full image: cell ``i`` along an axis of length ``n`` split into
``k`` bins covers pixels ``[floor(i*n/k), floor((i+1)*n/k))``, so every pixel lies in exactly
one cell and per-cell sums are exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from .boxes import as_boxes

__all__ = [
    "LAYER_NAMES",
    "UNKNOWN_LAYER",
    "area_mean",
    "box_cell_areas",
    "cell_sums",
    "depth_grid",
    "depth_layers",
    "grid_medians",
    "grid_size",
    "lowres_depths",
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


# ----------------------------------------------------------------------------- low-resolution maps


def grid_size(height: int, width: int, longest: int = 64) -> tuple[int, int]:
    """(h, w) of a grid whose longest side is ``longest``, aspect ratio kept, never upsampled.

    Each side is at least 1 and at most the image's own side, so every cell holds a pixel.
    """
    if height < 1 or width < 1 or longest < 1:
        raise ValueError(f"need positive sizes, got {height}x{width} and longest={longest}")
    scale = min(1.0, longest / max(height, width))
    return (
        int(min(height, max(1, round(height * scale)))),
        int(min(width, max(1, round(width * scale)))),
    )


def _bin_edges(n: int, k: int) -> np.ndarray:
    """(k + 1,) int64 pixel edges of ``k`` integer-aligned bins over ``n`` pixels (k <= n)."""
    return (np.arange(k + 1, dtype=np.int64) * n) // k


def _check_grid(shape: tuple[int, ...], grid: tuple[int, int]) -> tuple[int, int, int, int]:
    if len(shape) < 2:
        raise ValueError(f"values must have shape (..., H, W), got {shape}")
    height, width = shape[-2:]
    h, w = (int(v) for v in grid)
    if not (1 <= h <= height and 1 <= w <= width):
        raise ValueError(f"grid {grid} does not fit an image of {height}x{width}")
    return height, width, h, w


def cell_sums(values: ArrayLike, grid: tuple[int, int]) -> np.ndarray:
    """Sum of each grid cell over the last two axes.

    Arguments:
      values: (..., H, W) numeric or bool (bool sums are pixel counts, e.g. of masks).
      grid: (h, w) with 1 <= h <= H and 1 <= w <= W.

    Returns:
      (..., h, w) float64.

    reduceat casts its whole input to the accumulator type first, so the leading items go one
    at a time: the temporary is one (H, W) map, not N full-resolution float64 masks.
    """
    a = np.asarray(values)
    height, width, h, w = _check_grid(a.shape, grid)
    rows, cols = _bin_edges(height, h)[:-1], _bin_edges(width, w)[:-1]
    items = a.reshape(-1, height, width)
    out = np.empty((items.shape[0], h, w), dtype=np.float64)
    for i, item in enumerate(items):
        out[i] = np.add.reduceat(np.add.reduceat(item, rows, axis=0, dtype=np.float64), cols, axis=1)
    return out.reshape(*a.shape[:-2], h, w)


def area_mean(depth: ArrayLike, grid: tuple[int, int]) -> np.ndarray:
    """Area-averaged downsampling of a depth map; non-finite pixels are left out.

    Arguments:
      depth: (H, W) float.
      grid: (h, w), e.g. from :func:`grid_size`.

    Returns:
      (h, w) float64 mean of each cell's finite pixels; NaN where a cell has none.
    """
    d = np.asarray(depth)
    if d.ndim != 2:
        raise ValueError(f"depth must have shape (H, W), got {d.shape}")
    if not np.issubdtype(d.dtype, np.floating):
        d = d.astype(np.float64)
    finite = np.isfinite(d)
    if finite.all():
        # The common case, in half the passes: cell_sums accumulates in float64 from the same
        # float64 values either way, and a cell's count is its size, exactly.
        sums = cell_sums(d, grid)
        height, width, h, w = _check_grid(d.shape, grid)
        counts = np.outer(np.diff(_bin_edges(height, h)), np.diff(_bin_edges(width, w))).astype(np.float64)
    else:
        sums = cell_sums(np.where(finite, d.astype(np.float64), 0.0), grid)
        counts = cell_sums(finite, grid)
    out = np.full(sums.shape, np.nan)
    np.divide(sums, counts, out=out, where=counts > 0)
    return out


def box_cell_areas(boxes: ArrayLike, image_size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """Pixel area of each box inside each grid cell.

    Arguments:
      boxes: (N, 4) float xyxy in image pixels; parts outside the image count for nothing.
      image_size: (H, W).
      grid: (h, w).

    Returns:
      (N, h, w) float64; a cell's area times the box's coverage of it.
    """
    b = as_boxes(boxes)
    height, width, h, w = _check_grid(tuple(image_size), grid)

    def overlap(lo: np.ndarray, hi: np.ndarray, edges: np.ndarray) -> np.ndarray:
        # (N, k) length of [lo, hi] inside each bin [edges[i], edges[i+1]).
        start = np.maximum(lo[:, None], edges[None, :-1])
        stop = np.minimum(hi[:, None], edges[None, 1:])
        return np.clip(stop - start, 0.0, None)

    ys = overlap(b[:, 1], b[:, 3], _bin_edges(height, h).astype(np.float64))
    xs = overlap(b[:, 0], b[:, 2], _bin_edges(width, w).astype(np.float64))
    return ys[:, :, None] * xs[:, None, :]


def grid_medians(grid_values: ArrayLike, weights: ArrayLike) -> np.ndarray:
    """Weighted median of a low-resolution map under each weight map.

    With pixel counts as weights this is the median over those pixels of the map upsampled by
    nearest cell: each pixel takes its cell's value.

    Arguments:
      grid_values: (h, w) float; NaN cells get no weight.
      weights: (N, h, w) float >= 0.

    Returns:
      (N,) float64 lower weighted median (the smallest value whose cumulative weight reaches
      half the total); NaN where the total weight is 0.
    """
    v = np.asarray(grid_values, dtype=np.float64)
    wt = np.asarray(weights, dtype=np.float64)
    if v.ndim != 2 or wt.ndim != 3 or wt.shape[1:] != v.shape:
        raise ValueError(f"need values (h, w) and weights (N, h, w); got {v.shape} and {wt.shape}")
    flat = v.reshape(-1)
    ok = np.isfinite(flat)
    order = np.argsort(np.where(ok, flat, np.inf), kind="stable")
    sorted_weights = np.where(ok, wt.reshape(wt.shape[0], flat.size), 0.0)[:, order]  # (N, h*w)
    cum = np.cumsum(sorted_weights, axis=1)
    total = cum[:, -1] if cum.shape[1] else np.zeros(wt.shape[0])
    out = np.full(wt.shape[0], np.nan)
    has = total > 0
    if has.any():
        first = np.argmax(cum[has] >= 0.5 * total[has, None], axis=1)
        out[has] = flat[order][first]
    return out


def depth_grid(value: dict[str, Any] | None) -> np.ndarray | None:
    """The map of a stored low-resolution depth struct; None when the row has none.

    Arguments:
      value: ``{"height": h, "width": w, "values": [h * w floats, row-major]}`` (the
        ``depth_lowres`` column), or None.

    Returns:
      (h, w) float32, NaN cells kept; None for None.
    """
    if value is None:
        return None
    height, width = int(value["height"]), int(value["width"])
    values = np.asarray(value["values"], dtype=np.float32)
    if height < 1 or width < 1 or values.size != height * width:
        raise ValueError(f"depth_lowres of {height}x{width} cells holds {values.size} values")
    return values.reshape(height, width)


def lowres_depths(grid_values: ArrayLike, masks: ArrayLike, boxes: ArrayLike) -> np.ndarray:
    """Per-object depth from a low-resolution map: the median inside the mask, else the box.

    Arguments:
      grid_values: (h, w) float low-resolution depth map of the whole image.
      masks: (N, H, W) bool full-resolution masks.
      boxes: (N, 4) float xyxy, used where a mask is empty or covers only NaN cells.

    Returns:
      (N,) float64; NaN where neither the mask nor the box covers a finite cell.
    """
    v = np.asarray(grid_values, dtype=np.float64)
    m = np.asarray(masks)
    b = as_boxes(boxes)
    if v.ndim != 2 or m.ndim != 3 or b.shape[0] != m.shape[0]:
        raise ValueError(
            f"need map (h, w), masks (N, H, W), boxes (N, 4); got {v.shape}, {m.shape}, {b.shape}"
        )
    grid = (int(v.shape[0]), int(v.shape[1]))
    out = grid_medians(v, cell_sums(m, grid))
    missing = np.isnan(out)
    if missing.any():
        out[missing] = grid_medians(v, box_cell_areas(b[missing], m.shape[1:], grid))
    return out
