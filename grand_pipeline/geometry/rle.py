"""COCO run-length encoding, compatible with pycocotools' compressed strings.

Format (as in COCO's ``maskApi.c``): a mask of size (H, W) is flattened in
column-major (Fortran) order and described by run lengths that alternate
0-runs and 1-runs, always starting with a (possibly empty) 0-run. The
compressed string stores each count as 5-bit chunks, least significant first,
with bit 0x20 meaning "more chunks follow" and bit 0x10 of the last chunk
acting as the sign bit; every chunk is offset by 48 into printable ASCII
(48..111). For i > 2 the stored value is ``counts[i] - counts[i - 2]``, which
keeps the numbers small for smooth shapes.

Everything is numpy-vectorised per RLE; validation failures raise
:class:`InvalidRLE` (a ``ValueError``) and never an ``IndexError``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from .boxes import nms_from_iou

__all__ = [
    "InvalidRLE",
    "area",
    "decode",
    "decode_one",
    "encode",
    "iou",
    "mask_nms",
    "masks_to_boxes",
    "to_bbox",
    "union",
]

RLE = dict[str, Any]

# A valid count delta is below 2**35 in magnitude (7 chunks); 12 chunks still fit
# int64 after shifting, so anything longer is rejected as garbage.
_MAX_CHUNKS = 12


class InvalidRLE(ValueError):
    """Raised when an RLE dict is malformed or inconsistent."""


# ----------------------------------------------------------------------------- string codec


def _counts_to_string(counts: np.ndarray) -> str:
    """(K,) int64 run lengths -> compressed COCO string (maskApi.c rleToString)."""
    x = counts.astype(np.int64)
    if x.size > 3:
        x[3:] -= counts[1:-2]
    chunks: list[np.ndarray] = []
    emitted: list[np.ndarray] = []
    alive = np.ones(x.shape[0], dtype=bool)
    rest = x
    while alive.any():
        c = rest & 0x1F
        rest = rest >> 5  # arithmetic shift: negative values converge to -1
        more = np.where((c & 0x10) != 0, rest != -1, rest != 0)
        chunks.append(np.where(more, c | 0x20, c) + 48)
        emitted.append(alive)
        alive = alive & more
    # (K, chunks) row-major selection keeps each count's chunks contiguous and in order.
    table = np.stack(chunks, axis=1)
    used = np.stack(emitted, axis=1)
    return table[used].astype(np.uint8).tobytes().decode("ascii")


def _string_to_counts(s: bytes) -> np.ndarray:
    """Compressed COCO string -> (K,) int64 run lengths (maskApi.c rleFrString)."""
    b = np.frombuffer(s, dtype=np.uint8).astype(np.int64) - 48
    if b.size == 0:
        return np.zeros(0, dtype=np.int64)
    bad = np.flatnonzero((b < 0) | (b > 63))
    if bad.size:
        ch = s[int(bad[0]) : int(bad[0]) + 1]
        raise InvalidRLE(f"invalid character {ch!r} at position {int(bad[0])} in RLE counts")
    last = (b & 0x20) == 0
    if not last[-1]:
        raise InvalidRLE("truncated RLE counts string (last value has its continuation bit set)")
    ends = np.flatnonzero(last)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > _MAX_CHUNKS:
        raise InvalidRLE("RLE counts string encodes a value that is too large")
    pos = np.arange(b.size) - np.repeat(starts, lengths)
    x = np.add.reduceat((b & 0x1F) << (5 * pos), starts)
    negative = (b[ends] & 0x10) != 0
    x = np.where(negative, x | (np.int64(-1) << (5 * lengths)), x)
    # Undo the delta coding: counts[i] = x[i] + counts[i-2] for i > 2, i.e. running
    # sums over the odd indices from 1 and over the even indices from 2.
    counts = x.copy()
    counts[1::2] = np.cumsum(x[1::2])
    counts[2::2] = np.cumsum(x[2::2])
    return counts


# ----------------------------------------------------------------------------- validation


def _parse(rle: Any) -> tuple[int, int, np.ndarray]:
    """Validate one RLE dict -> (H, W, counts (K,) int64) with sum(counts) == H*W."""
    if not isinstance(rle, Mapping):
        raise InvalidRLE(f"RLE must be a dict with 'size' and 'counts', got {type(rle).__name__}")
    if "size" not in rle or "counts" not in rle:
        raise InvalidRLE(f"RLE dict needs 'size' and 'counts' keys, got {sorted(map(str, rle))}")
    size = rle["size"]
    if (
        not isinstance(size, (Sequence, np.ndarray))
        or isinstance(size, (str, bytes))
        or len(size) != 2
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in size)
        or min(int(v) for v in size) < 0
    ):
        raise InvalidRLE(f"RLE 'size' must be two non-negative ints [H, W], got {size!r}")
    h, w = int(size[0]), int(size[1])
    raw = rle["counts"]
    if isinstance(raw, str):
        try:
            raw = raw.encode("ascii")
        except UnicodeEncodeError as e:
            raise InvalidRLE("RLE counts string contains non-ASCII characters") from e
    if isinstance(raw, (bytes, bytearray)):
        counts = _string_to_counts(bytes(raw))
    elif isinstance(raw, (Sequence, np.ndarray)):
        arr = np.asarray(raw)
        if arr.size and (arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer)):
            raise InvalidRLE("uncompressed RLE counts must be a flat list of ints")
        counts = arr.astype(np.int64).reshape(-1)
    else:
        raise InvalidRLE(f"RLE 'counts' must be str, bytes or list of ints, got {type(raw).__name__}")
    if counts.size and counts.min() < 0:
        raise InvalidRLE("RLE counts must be non-negative")
    total = int(counts.sum(dtype=np.int64)) if counts.size else 0
    if counts.size and (counts.max() > h * w or total != h * w):
        raise InvalidRLE(f"RLE counts sum to {total} but size {h}x{w} needs {h * w}")
    if not counts.size and h * w:
        raise InvalidRLE(f"empty RLE counts for non-empty size {h}x{w}")
    return h, w, counts


def _as_list(rles: Any) -> list[Any]:
    if isinstance(rles, Mapping):
        raise InvalidRLE("expected a sequence of RLE dicts; use decode_one() for a single RLE")
    if not isinstance(rles, (Sequence, np.ndarray)) or isinstance(rles, (str, bytes)):
        raise InvalidRLE(f"expected a sequence of RLE dicts, got {type(rles).__name__}")
    return list(rles)


# ----------------------------------------------------------------------------- encode / decode


def encode(masks: ArrayLike) -> list[RLE]:
    """Encode binary masks as compressed COCO RLE.

    Arguments:
      masks: (N, H, W) or (H, W) bool/uint8; any nonzero value is foreground.

    Returns:
      list of N dicts ``{"size": [H, W], "counts": str}``; ``counts`` is
      byte-identical to ``pycocotools.mask.encode(...)["counts"].decode()``.
    """
    m = np.asarray(masks)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise ValueError(f"masks must have shape (N, H, W) or (H, W), got {m.shape}")
    n, h, w = m.shape
    # Transposing to (N, W, H) and flattening row-major is the per-mask Fortran order.
    flat = (m != 0).transpose(0, 2, 1).reshape(n, h * w)
    out: list[RLE] = []
    for row in flat:
        if row.size == 0:
            counts = np.zeros(1, dtype=np.int64)  # maskApi.c emits a single 0 count
        else:
            edges = np.flatnonzero(row[1:] != row[:-1]) + 1
            bounds = np.concatenate(([0], edges, [row.size]))
            counts = np.diff(bounds).astype(np.int64)
            if row[0]:
                counts = np.concatenate(([0], counts))  # runs always start with zeros
        out.append({"size": [h, w], "counts": _counts_to_string(counts)})
    return out


def _dense(h: int, w: int, counts: np.ndarray) -> np.ndarray:
    values = (np.arange(counts.size) & 1).astype(bool)
    return np.repeat(values, counts).reshape(w, h).T


def decode_one(rle: RLE) -> np.ndarray:
    """Decode one RLE dict (compressed str/bytes or uncompressed list counts).

    Returns:
      (H, W) bool mask.
    """
    h, w, counts = _parse(rle)
    return np.ascontiguousarray(_dense(h, w, counts))


def decode(rles: Sequence[RLE]) -> np.ndarray:
    """Decode a list of RLE dicts that share one size.

    Returns:
      (N, H, W) bool; an empty list gives shape (0, 0, 0).
    """
    items = [_parse(r) for r in _as_list(rles)]
    if not items:
        return np.zeros((0, 0, 0), dtype=bool)
    sizes = {(h, w) for h, w, _ in items}
    if len(sizes) > 1:
        raise InvalidRLE(f"cannot stack RLEs of different sizes: {sorted(sizes)}")
    h, w = items[0][:2]
    out = np.empty((len(items), h, w), dtype=bool)
    for i, (_, _, counts) in enumerate(items):
        out[i] = _dense(h, w, counts)
    return out


# ----------------------------------------------------------------------------- measurements


def area(rles: Sequence[RLE]) -> np.ndarray:
    """Foreground pixel count per RLE, computed from the runs (no dense mask).

    Returns:
      (N,) int64.
    """
    parsed = [_parse(r) for r in _as_list(rles)]
    return np.asarray([int(c[1::2].sum()) for _, _, c in parsed], dtype=np.int64)


def to_bbox(rles: Sequence[RLE]) -> np.ndarray:
    """Tight box of each RLE mask, computed from the runs.

    Returns:
      (N, 4) float64 xyxy with exclusive x2/y2 (``x_max + 1``), i.e. pycocotools
      ``toBbox`` (xywh) converted to xyxy. Empty masks give zeros.
    """
    parsed = [_parse(r) for r in _as_list(rles)]
    out = np.zeros((len(parsed), 4), dtype=np.float64)
    for i, (h, _, counts) in enumerate(parsed):
        ends = np.cumsum(counts)
        starts = ends - counts
        fg = (np.arange(counts.size) & 1).astype(bool) & (counts > 0)
        if not fg.any():
            continue
        s, e = starts[fg], ends[fg] - 1  # inclusive flat (column-major) indices of 1-runs
        xs, xe = s // h, e // h
        # A run that wraps into a later column covers the column bottom and top rows.
        wraps = xs != xe
        ys = np.where(wraps, 0, s % h)
        ye = np.where(wraps, h - 1, e % h)
        out[i] = (xs.min(), ys.min(), xe.max() + 1, ye.max() + 1)
    return out


def union(rles: Sequence[RLE]) -> RLE:
    """Pixel-wise OR of RLE masks of one size, computed on the runs (no dense mask).

    GLaMM pairs one target with each grounded phrase, and a phrase may name several objects:
    its target is the OR of their masks. The reference *summed* decoded masks instead, which
    gives overlaps the value 2 (a BCE target outside [0, 1]).

    Arguments:
      rles: N >= 1 RLE dicts of one size (H, W).

    Returns:
      one compressed RLE ``{"size": [H, W], "counts": str}``, byte-identical to
      ``pycocotools.mask.merge(rles, intersect=False)``.
    """
    parsed = [_parse(r) for r in _as_list(rles)]
    if not parsed:
        raise InvalidRLE("union of no masks: give at least one RLE")
    sizes = {(h, w) for h, w, _ in parsed}
    if len(sizes) > 1:
        raise InvalidRLE(f"cannot merge RLEs of different sizes: {sorted(sizes)}")
    h, w = parsed[0][:2]
    starts, ends = [], []
    for _, _, counts in parsed:
        bounds = np.concatenate(([0], np.cumsum(counts)))
        # 1-runs are the odd-indexed counts: [bounds[i], bounds[i + 1]) for odd i.
        starts.append(bounds[1:-1:2])
        ends.append(bounds[2::2])
    s, e = np.concatenate(starts), np.concatenate(ends)
    keep = e > s
    s, e = s[keep], e[keep]
    if s.size == 0:
        merged = np.asarray([h * w], dtype=np.int64)
    else:
        order = np.argsort(s, kind="stable")
        s, e = s[order], e[order]
        reach = np.maximum.accumulate(e)
        # A run opens a new interval when it starts after everything before it ended (touching
        # runs merge, as they must: COCO counts never hold an empty run between two 1-runs).
        new = np.concatenate(([True], s[1:] > reach[:-1]))
        first = s[new]
        last = np.maximum.reduceat(e, np.flatnonzero(new))
        edges = np.empty(2 * first.size + 2, dtype=np.int64)
        edges[0], edges[-1] = 0, h * w
        edges[1:-1:2], edges[2:-1:2] = first, last
        merged = np.diff(edges)
        if merged[-1] == 0:
            merged = merged[:-1]  # the mask ends with a 1-run: no trailing 0-run
    return {"size": [h, w], "counts": _counts_to_string(merged)}


def masks_to_boxes(masks: ArrayLike) -> np.ndarray:
    """Tight boxes of dense masks.

    Arguments:
      masks: (N, H, W) bool (nonzero is foreground).

    Returns:
      (N, 4) float64 xyxy with exclusive x2/y2 (COCO convention: ``w = x_max - x_min + 1``).
      Empty masks give zeros.
    """
    m = np.asarray(masks) != 0
    if m.ndim != 3:
        raise ValueError(f"masks must have shape (N, H, W), got {m.shape}")
    n, h, w = m.shape
    out = np.zeros((n, 4), dtype=np.float64)
    if n == 0 or h == 0 or w == 0:
        return out
    rows = m.any(axis=2)  # (N, H)
    cols = m.any(axis=1)  # (N, W)
    nonempty = rows.any(axis=1)
    y0 = rows.argmax(axis=1)
    y1 = h - rows[:, ::-1].argmax(axis=1)
    x0 = cols.argmax(axis=1)
    x1 = w - cols[:, ::-1].argmax(axis=1)
    out[nonempty] = np.stack([x0, y0, x1, y1], axis=1)[nonempty]
    return out


def _flat_masks(rles: Sequence[RLE], size: tuple[int, int] | None) -> tuple[np.ndarray, tuple[int, int]]:
    items = _as_list(rles)
    if not items:
        return np.zeros((0, 0), dtype=bool), size or (0, 0)
    dense = decode(items)
    got = (dense.shape[1], dense.shape[2])
    if size is not None and got != size:
        raise InvalidRLE(f"mask sizes differ: {size} vs {got}")
    return dense.reshape(dense.shape[0], -1), got


def iou(rles_a: Sequence[RLE], rles_b: Sequence[RLE]) -> np.ndarray:
    """Pairwise mask IoU, equal to ``pycocotools.mask.iou(a, b, [0] * len(b))``.

    Masks are decoded and the intersections come from one matrix product on the
    flattened masks. Memory: N*H*W bytes (bool A) plus M*H*W*4 bytes (float B),
    plus A converted in blocks of 64 rows; fine for per-image mask sets.

    Returns:
      (N, M) float64; pairs with an empty union get 0. All masks must share one
      size, otherwise :class:`InvalidRLE`.
    """
    a, size = _flat_masks(rles_a, None)
    b, _ = _flat_masks(rles_b, size if a.shape[0] else None)
    n, m = a.shape[0], b.shape[0]
    if n == 0 or m == 0:
        return np.zeros((n, m), dtype=np.float64)
    # float32 sums of 0/1 are exact below 2**24 pixels; switch to float64 beyond.
    dtype: type[np.floating[Any]] = np.float32 if a.shape[1] < 2**24 else np.float64
    bf = b.astype(dtype)
    inter = np.empty((n, m), dtype=np.float64)
    for lo in range(0, n, 64):
        inter[lo : lo + 64] = a[lo : lo + 64].astype(dtype) @ bf.T
    area_a = a.sum(axis=1, dtype=np.int64).astype(np.float64)
    area_b = b.sum(axis=1, dtype=np.int64).astype(np.float64)
    union = area_a[:, None] + area_b[None, :] - inter
    out = np.zeros((n, m), dtype=np.float64)
    np.divide(inter, union, out=out, where=union > 0)
    return out


def mask_nms(rles: Sequence[RLE], scores: ArrayLike, iou_threshold: float) -> np.ndarray:
    """Greedy NMS by mask IoU (dedupes an "everything" mask generator).

    Arguments:
      rles: N RLE dicts of one size.
      scores: (N,) float.
      iou_threshold: suppress when mask IoU with a kept mask is strictly greater.

    Returns:
      (K,) int64 kept indices in descending score order (ties: lower index first).
    """
    items = _as_list(rles)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.shape[0] != len(items):
        raise ValueError(f"got {len(items)} masks but {s.shape[0]} scores")
    if not items:
        return np.zeros(0, dtype=np.int64)
    return nms_from_iou(iou(items, items), s, iou_threshold)
