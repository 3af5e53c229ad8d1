"""Helpers shared by the level-1 stages: object iteration, box/mask arrays, plain-value rounding.

Objects travel between stages as plain dicts with exactly the keys of ``schemas.OBJECT``. Values
are kept as plain Python numbers, rounded once (boxes to 2 decimals, scores to 4) so that rows
are stable across runs and pyarrow never sees numpy scalars.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from grand_pipeline.geometry import rle
from grand_pipeline.geometry.boxes import as_boxes
from grand_pipeline.models.roles import Backend, Region
from grand_pipeline.schemas import OBJECT
from grand_pipeline.stage import ImageRecord

logger = logging.getLogger(__name__)

#: Keys of one object dict, in schema order.
OBJECT_KEYS: tuple[str, ...] = tuple(OBJECT.field(i).name for i in range(OBJECT.num_fields))

#: The two record fields that hold object dicts.
OBJECT_FIELDS = ("objects", "floating_objects")

#: Dense masks are built this many objects at a time: a full-resolution SA-1B mask is ~3 MB, so
#: a hundred objects at once would cost hundreds of MB per image.
MASK_CHUNK = 64

BOX_DECIMALS = 2
SCORE_DECIMALS = 4


def round_box(box: Any) -> list[float]:
    """Four plain floats rounded to ``BOX_DECIMALS``."""
    return [round(float(v), BOX_DECIMALS) for v in np.asarray(box, dtype=np.float64).reshape(4)]


def round_score(value: Any) -> float | None:
    """A plain float rounded to ``SCORE_DECIMALS``; None and NaN become None."""
    if value is None:
        return None
    value = float(value)
    if np.isnan(value):
        return None
    return round(value, SCORE_DECIMALS)


def plain_rle(mask_rle: dict[str, Any] | None) -> dict[str, Any] | None:
    """A COCO RLE as ``{"size": [h, w], "counts": str}`` (SA-1B JSON may hold bytes counts)."""
    if mask_rle is None:
        return None
    counts = mask_rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    elif not isinstance(counts, str):
        # Uncompressed (list) counts: re-encode so every stored mask has one representation.
        return rle.encode(rle.decode_one(mask_rle))[0]
    return {"size": [int(v) for v in mask_rle["size"]], "counts": counts}


def all_objects(record: ImageRecord) -> list[dict[str, Any]]:
    """Objects then floating objects of a record (the same dicts, so stages fill them in place)."""
    return [obj for key in OBJECT_FIELDS for obj in record.fields.get(key, [])]


def object_boxes(objects: list[dict[str, Any]]) -> np.ndarray:
    """(N, 4) float64 xyxy boxes of object dicts."""
    return as_boxes([obj["bbox"] for obj in objects])


def region_boxes(regions: list[Region]) -> np.ndarray:
    """(N, 4) float64 xyxy boxes of region proposals."""
    return as_boxes([np.asarray(r.bbox, dtype=np.float64).reshape(4) for r in regions])


def image_size(record: ImageRecord) -> tuple[int, int]:
    """(H, W) of the decoded image; the record's declared size only if no pixels are loaded."""
    if record.image is not None:
        return int(record.image.shape[0]), int(record.image.shape[1])
    return int(record.height), int(record.width)


def box_mask(box: Any, height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of the pixels a float xyxy box covers (at least one pixel when inside)."""
    x1, y1, x2, y2 = np.asarray(box, dtype=np.float64).reshape(4)
    left = int(np.clip(np.floor(x1), 0, width - 1))
    top = int(np.clip(np.floor(y1), 0, height - 1))
    right = int(np.clip(np.ceil(x2), left + 1, width))
    bottom = int(np.clip(np.ceil(y2), top + 1, height))
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def dense_mask(segmentation: dict[str, Any] | None, box: Any, height: int, width: int) -> np.ndarray:
    """The mask of one item: its RLE when it has one of the image's size, else its box."""
    if segmentation is not None:
        size = [int(v) for v in segmentation["size"]]
        if size == [height, width]:
            return rle.decode_one(segmentation)
        logger.warning("mask of size %s on a %dx%d image; using the box instead", size, height, width)
    return box_mask(box, height, width)


def iter_mask_chunks(
    items: list[tuple[dict[str, Any] | None, Any]], height: int, width: int, chunk: int = MASK_CHUNK
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (start index, (K, H, W) bool masks) for (segmentation, box) items, ``chunk`` at a time."""
    for start in range(0, len(items), chunk):
        part = items[start : start + chunk]
        yield start, np.stack([dense_mask(seg, box, height, width) for seg, box in part])


def backend_source(backend: Backend) -> str:
    """How an output names the model behind it; heuristic stand-ins say so."""
    name = backend.model_id or backend.backend
    return f"{name} (heuristic)" if backend.heuristic else name
