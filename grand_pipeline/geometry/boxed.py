"""Binary masks kept as the crop of their tight box, on one torch device.

A full-resolution SA-1B or SAM mask is H*W bytes (3.4 MB at 2250x1500), but an object covers a
fraction of it, and everything Level 1 does with a mask reads only the pixels of its tight box:
containment in the object box, region crops, the depth median, the RLE. So a mask is decoded
once, straight into that box (the RLE's runs give the box without decoding anything), and kept
there; a dense (H, W) mask is only made for a caller that asks for one. This is lossless: outside
its tight box a mask is zero.

Crops live on a torch device: the CPU, or the GPU a segmenter made them on. Decoding runs on the
host and uploads all crops of one call in a single copy; encoding finds the run boundaries on
the device and brings back only their indices; medians are taken where the crops are. On the CPU
the kernels work on numpy views of the crops instead of calling torch: per-mask torch ops there
cost 3-6x numpy's (``kthvalue`` vs ``np.partition``, boolean gathers), and far more when the
actor's cores are contended.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike

from . import rle

__all__ = [
    "BoxedMasks",
    "decode",
    "encode",
    "fraction_inside",
    "from_boxes",
    "from_dense",
    "host_kernels",
    "median_depth",
]

_EMPTY_BOX = (0, 0, 0, 0)


def host_kernels(device: torch.device) -> bool:
    """Whether per-mask work on ``device`` runs in numpy on views of the crops (the CPU) rather
    than in torch (a GPU). One switch, so tests can run the torch kernels on a CPU."""
    return device.type == "cpu"


@dataclass(frozen=True)
class BoxedMasks:
    """N masks of one (H, W) image.

    Attributes:
      size: (H, W).
      boxes: (N, 4) int64 xyxy tight boxes, x2/y2 exclusive; (0, 0, 0, 0) for an empty mask.
      crops: N bool tensors on ``device``; ``crops[i]`` is (y2 - y1, x2 - x1) of ``boxes[i]``.
      device: where the crops are.

    It also reads as a (N, H, W) bool mask array (``shape``, ``len``, ``masks[i]`` -> dense (H, W)
    tensor, ``np.asarray``), for callers written against dense masks.
    """

    size: tuple[int, int]
    boxes: np.ndarray
    crops: tuple[torch.Tensor, ...]
    device: torch.device

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.crops), *self.size)

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, i: int) -> torch.Tensor:
        """Dense (H, W) bool mask ``i`` on ``device``."""
        height, width = self.size
        return self.window(i, (0, 0, width, height))

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.zeros(self.shape, dtype=bool)
        for i, crop in enumerate(self.crops):
            x1, y1, x2, y2 = (int(v) for v in self.boxes[i])
            out[i, y1:y2, x1:x2] = crop.cpu().numpy()
        return out if dtype is None or np.dtype(dtype) == np.bool_ else out.astype(dtype)

    def take(self, idx: Sequence[int] | np.ndarray) -> BoxedMasks:
        """The masks at ``idx``, in that order (the crops are shared, not copied)."""
        order = [int(i) for i in np.asarray(idx, dtype=np.int64).reshape(-1)]
        return BoxedMasks(
            self.size, self.boxes[order].reshape(-1, 4), tuple(self.crops[i] for i in order), self.device
        )

    def to(self, device: torch.device | str) -> BoxedMasks:
        device = torch.device(device)
        if device == self.device:
            return self
        return BoxedMasks(
            self.size, self.boxes, tuple(_upload([c.cpu().numpy() for c in self.crops], device)), device
        )

    def window(self, i: int, box: tuple[int, int, int, int]) -> torch.Tensor:
        """Mask ``i`` inside the integer window [x1, x2) x [y1, y2) of the image: (y2-y1, x2-x1) bool."""
        x1, y1, x2, y2 = box
        on_host = host_kernels(self.device)
        out: Any = np.zeros((y2 - y1, x2 - x1), dtype=bool)
        if not on_host:
            out = torch.zeros((y2 - y1, x2 - x1), dtype=torch.bool, device=self.device)
        bx1, by1, bx2, by2 = (int(v) for v in self.boxes[i])
        ix1, iy1, ix2, iy2 = max(x1, bx1), max(y1, by1), min(x2, bx2), min(y2, by2)
        if ix1 < ix2 and iy1 < iy2:
            part = self.crops[i][iy1 - by1 : iy2 - by1, ix1 - bx1 : ix2 - bx1]
            out[iy1 - y1 : iy2 - y1, ix1 - x1 : ix2 - x1] = part.numpy() if on_host else part
        return torch.from_numpy(out) if on_host else out

    def areas(self) -> np.ndarray:
        """(N,) int64 pixel count of each mask."""
        if host_kernels(self.device):
            return np.asarray([np.count_nonzero(c.numpy()) for c in self.crops], dtype=np.int64)
        return _host([c.sum() for c in self.crops], np.int64)

    @staticmethod
    def concat(parts: Sequence[BoxedMasks], size: tuple[int, int], device: torch.device) -> BoxedMasks:
        """Masks of several sets of one size, in order, on ``device``."""
        parts = [p.to(device) for p in parts]
        if any(tuple(p.size) != tuple(size) for p in parts):
            raise ValueError(f"cannot join masks of sizes {[p.size for p in parts]} into {size}")
        boxes = np.concatenate([p.boxes for p in parts]) if parts else np.zeros((0, 4), np.int64)
        crops = tuple(c for p in parts for c in p.crops)
        return BoxedMasks((int(size[0]), int(size[1])), boxes.reshape(-1, 4), crops, device)


def _host(values: list[torch.Tensor], dtype: Any) -> np.ndarray:
    """Scalars on a device -> numpy, in one transfer."""
    if not values:
        return np.zeros(0, dtype=dtype)
    return torch.stack(values).cpu().numpy().astype(dtype)


def _upload(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Host arrays -> tensors on ``device``: views on the CPU, one pinned copy for a GPU."""
    if host_kernels(device):
        return [torch.from_numpy(a) for a in arrays]
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0, bool)
    host = torch.from_numpy(flat)
    if device.type == "cuda":
        host = host.pin_memory()
    on_device = host.to(device, non_blocking=True)
    out, start = [], 0
    for a in arrays:
        out.append(on_device[start : start + a.size].view(a.shape))
        start += a.size
    return out


def _crop_of_counts(h: int, counts: np.ndarray) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """One mask's run lengths -> (tight box, (y2-y1, x2-x1) bool crop); only the box's columns are expanded."""
    ends = np.cumsum(counts)
    starts = ends - counts
    ones = (np.arange(counts.size) & 1).astype(bool)
    fg = ones & (counts > 0)
    if not fg.any():
        return _EMPTY_BOX, np.zeros((0, 0), dtype=bool)
    s, e = starts[fg], ends[fg] - 1  # inclusive flat (column-major) ends of the 1-runs
    xs, xe = s // h, e // h
    wraps = xs != xe  # a run that continues in the next column covers its bottom and top rows
    y1 = int(np.where(wraps, 0, s % h).min())
    y2 = int(np.where(wraps, h - 1, e % h).max()) + 1
    x1, x2 = int(xs[0]), int(xe[-1]) + 1  # runs are in flat order
    lo, span = x1 * h, (x2 - x1) * h
    bounds = np.clip(np.concatenate(([0], ends)) - lo, 0, span)
    columns = np.repeat(ones, np.diff(bounds)).reshape(x2 - x1, h)
    # Row-major like the image: crops are read against image windows far more than encoded.
    return (x1, y1, x2, y2), np.ascontiguousarray(columns[:, y1:y2].T)


def decode(rles: Sequence[dict[str, Any]], device: torch.device | str = "cpu") -> BoxedMasks:
    """Decode RLE dicts of one size straight into their tight boxes.

    Arguments:
      rles: N COCO RLE dicts (compressed or list counts), validated like ``rle.decode``.
      device: where the crops go.

    Returns:
      BoxedMasks; N == 0 gives size (0, 0).
    """
    device = torch.device(device)
    parsed = [rle.parse(r) for r in rles]
    sizes = {(h, w) for h, w, _ in parsed}
    if len(sizes) > 1:
        raise rle.InvalidRLE(f"cannot stack RLEs of different sizes: {sorted(sizes)}")
    size = next(iter(sizes), (0, 0))
    boxes, crops = [], []
    for h, _, counts in parsed:
        box, crop = _crop_of_counts(h, counts)
        boxes.append(box)
        crops.append(crop)
    box_array = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    return BoxedMasks(size, box_array, tuple(_upload(crops, device)), device)


def from_dense(masks: ArrayLike | torch.Tensor, device: torch.device | str | None = None) -> BoxedMasks:
    """Dense (N, H, W) masks (numpy or a tensor; nonzero is inside) -> BoxedMasks.

    A tensor stays on its device unless ``device`` is given (numpy goes to the CPU); the crops are
    copies, so the dense masks can be freed. Tight boxes come from per-axis ``any``.
    """
    source = masks.device if isinstance(masks, torch.Tensor) else torch.device("cpu")
    target = torch.device(device) if device is not None else source
    on_host = host_kernels(source)  # boxes found where the masks are; the crops go in one copy
    m: Any = masks
    if on_host:
        m = masks.numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    elif not isinstance(masks, torch.Tensor):
        m = torch.from_numpy(np.asarray(masks))
    if m.ndim != 3:
        raise ValueError(f"masks must have shape (N, H, W), got {tuple(m.shape)}")
    n, h, w = (int(v) for v in m.shape)
    if n == 0 or h == 0 or w == 0:
        empty = [np.zeros((0, 0), dtype=bool) for _ in range(n)]
        return BoxedMasks((h, w), np.zeros((n, 4), np.int64), tuple(_upload(empty, target)), target)
    if on_host:
        fg = m if m.dtype == bool else m != 0
        cols, rows = fg.any(axis=1), fg.any(axis=2)  # (N, W), (N, H)
    else:
        fg = m if m.dtype == torch.bool else m != 0
        cols, rows = fg.any(dim=1).cpu().numpy(), fg.any(dim=2).cpu().numpy()
    boxes = np.zeros((n, 4), dtype=np.int64)
    for i in range(n):
        xs, ys = np.flatnonzero(cols[i]), np.flatnonzero(rows[i])
        if xs.size:
            boxes[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    windows = [fg[i, y1:y2, x1:x2] for i, (x1, y1, x2, y2) in enumerate(boxes.tolist())]
    if on_host:
        crops = _upload([np.array(c) for c in windows], target)
    else:
        crops = [c.clone() if c.device == target else c.to(target) for c in windows]
    return BoxedMasks((h, w), boxes, tuple(crops), target)


def from_boxes(boxes: ArrayLike, size: tuple[int, int], device: torch.device | str = "cpu") -> BoxedMasks:
    """The pixels float xyxy boxes cover (floor/ceil to pixel edges, at least one pixel, clipped)."""
    device = torch.device(device)
    height, width = size
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    left = np.clip(np.floor(b[:, 0]), 0, width - 1).astype(np.int64)
    top = np.clip(np.floor(b[:, 1]), 0, height - 1).astype(np.int64)
    right = np.clip(np.ceil(b[:, 2]), left + 1, width).astype(np.int64)
    bottom = np.clip(np.ceil(b[:, 3]), top + 1, height).astype(np.int64)
    tight = np.stack([left, top, right, bottom], axis=1)
    crops = _upload([np.ones((int(y2 - y1), int(x2 - x1)), dtype=bool) for x1, y1, x2, y2 in tight], device)
    return BoxedMasks((height, width), tight, tuple(crops), device)


def encode(masks: BoxedMasks) -> list[dict[str, Any]]:
    """COCO RLE of each mask, byte-identical to ``pycocotools.mask.encode`` of the dense masks.

    Flips are found on the crops' device (``rle.crop_changes``, in torch) and come back to the
    host in one transfer; the strings are made in one vectorised pass.
    """
    height, width = masks.size
    if host_kernels(masks.device):
        counts = [
            rle.counts_from_changes(rle.crop_changes(c.numpy(), int(b[0]), int(b[1]), height), height * width)
            for b, c in zip(masks.boxes, masks.crops, strict=True)
        ]
        return [{"size": [height, width], "counts": text} for text in rle.strings_from_counts(counts)]
    found: list[torch.Tensor] = []
    for box, crop in zip(masks.boxes, masks.crops, strict=True):
        h, w = crop.shape
        if crop.numel() == 0:
            found.append(torch.zeros(0, dtype=torch.int64, device=masks.device))
            continue
        padded = torch.zeros((w, h + 2), dtype=torch.bool, device=crop.device)
        padded[:, 1:-1] = crop.T
        flat = padded.reshape(-1)
        idx = torch.nonzero(flat[1:] != flat[:-1]).reshape(-1) + 1
        column, row = idx // (h + 2), idx % (h + 2)
        found.append((int(box[0]) + column) * height + (int(box[1]) - 1 + row))
    lengths = [int(f.numel()) for f in found]
    every = torch.cat(found).cpu().numpy() if found else np.zeros(0, np.int64)
    splits = np.split(every, np.cumsum(lengths)[:-1]) if found else []
    counts = [rle.counts_from_changes(c, height * width) for c in splits]
    return [{"size": [height, width], "counts": text} for text in rle.strings_from_counts(counts)]


def fraction_inside(masks: BoxedMasks, boxes: ArrayLike) -> np.ndarray:
    """Share of each mask's pixels whose centre lies inside its paired float xyxy box.

    Same rule and value as ``matching.fraction_inside`` on the dense masks: (N,) float64 in
    [0, 1], 0 for an empty mask.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(b) != len(masks):
        raise ValueError(f"{len(masks)} masks but {len(b)} boxes")
    on_host = host_kernels(masks.device)
    inside: list[Any] = []
    for (x1, y1, x2, y2), crop, box in zip(masks.boxes, masks.crops, b, strict=True):
        # Pixel (y, x) covers [x, x+1) x [y, y+1); it is inside when its centre is.
        xs = np.arange(x1, x2) + 0.5
        ys = np.arange(y1, y2) + 0.5
        in_x, in_y = (xs >= box[0]) & (xs <= box[2]), (ys >= box[1]) & (ys <= box[3])
        if on_host:
            # The pixels inside an interval form one run of rows and one of columns: a slice.
            cols, rows = np.flatnonzero(in_x), np.flatnonzero(in_y)
            if cols.size and rows.size:
                part = crop.numpy()[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
                inside.append(np.count_nonzero(part))
            else:
                inside.append(0)
        else:
            row_in, col_in = torch.from_numpy(in_y).to(crop.device), torch.from_numpy(in_x).to(crop.device)
            inside.append((crop & row_in[:, None] & col_in[None, :]).sum())
    got = np.asarray(inside, dtype=np.int64) if on_host else _host(inside, np.int64)
    count = masks.areas()
    return np.where(count > 0, got / np.maximum(count, 1), 0.0)


def _median(values: np.ndarray) -> float:
    """``np.median(values.astype(np.float64))``, bit for bit, with one single-kth partition.

    np.median partitions at both middle indices, which numpy does 3-4x slower than at one; the
    lower middle is the largest value left of the upper one. Selection never rounds, so it runs
    on the map's own dtype and only the chosen values go to float64.
    """
    if np.isnan(values).any():
        return float("nan")
    k = values.size // 2
    part = np.partition(values, k)
    upper = float(part[k])
    if values.size % 2:
        return upper
    return (float(part[:k].max()) + upper) / 2.0  # np.mean of the two: (a + b) / 2 in float64


def median_depth(depth: ArrayLike | torch.Tensor, masks: BoxedMasks) -> np.ndarray:
    """Median of a depth map inside each mask, exactly as ``np.median`` of the float64 values.

    Arguments:
      depth: (H, W) float map (a tensor is used where it is; numpy goes to the masks' device).
      masks: N masks of that size.

    Returns:
      (N,) float64: the middle value, or the mean of the two middle values in float64 for an even
      count (numpy's convention); NaN for an empty mask or one that holds a NaN.

    Each mask gathers only the pixels of its tight box. On the CPU that is ``np.median`` itself;
    on a GPU ``kthvalue`` selects the middle values there (selection does not round) and only two
    numbers per mask come back, so the result equals numpy's there too.
    """
    if isinstance(depth, torch.Tensor):
        shape = tuple(depth.shape)
    else:
        depth = np.asarray(depth)
        shape = depth.shape
    if len(shape) != 2 or tuple(shape) != tuple(masks.size):
        raise ValueError(f"depth must have shape {tuple(masks.size)}, got {tuple(shape)}")
    counts = masks.areas()
    out = np.full(len(masks), np.nan, dtype=np.float64)
    if host_kernels(masks.device):
        host = depth.cpu().numpy() if isinstance(depth, torch.Tensor) else depth
        for i, ((x1, y1, x2, y2), crop) in enumerate(zip(masks.boxes, masks.crops, strict=True)):
            if counts[i]:
                out[i] = _median(host[y1:y2, x1:x2][crop.numpy()])
        return out
    d = (depth if isinstance(depth, torch.Tensor) else torch.from_numpy(depth)).to(masks.device)
    stats = []  # per non-empty mask: (lower middle, upper middle, any NaN) as float64
    for (x1, y1, x2, y2), crop, k in zip(masks.boxes, masks.crops, counts, strict=True):
        if k == 0:
            continue
        values = d[y1:y2, x1:x2][crop].double()
        lo = torch.kthvalue(values, int((k + 1) // 2)).values
        hi = torch.kthvalue(values, int(k // 2 + 1)).values if k % 2 == 0 else lo
        stats.append(torch.stack([lo, hi, torch.isnan(values).any().double()]))
    if stats:
        lo, hi, has_nan = torch.stack(stats).cpu().numpy().T
        # np.median's convention: the mean of the two middle values, (a + b) / 2 in float64.
        med = np.where(counts[counts > 0] % 2 == 1, lo, (lo + hi) / 2.0)
        out[counts > 0] = np.where(has_nan > 0, np.nan, med)
    return out
