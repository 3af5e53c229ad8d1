"""Helpers shared by the level-1 stages: object iteration, box/mask arrays, plain-value rounding.

Objects travel between stages as plain dicts with exactly the keys of ``schemas.OBJECT``. Values
are kept as plain Python numbers, rounded once (boxes to 2 decimals, scores to 4) so that rows
are stable across runs and pyarrow never sees numpy scalars.
"""

from __future__ import annotations

import logging
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


def backend_source(backend: Backend) -> str:
    """How an output names the model behind it; heuristic stand-ins say so."""
    name = backend.model_id or backend.backend
    return f"{name} (heuristic)" if backend.heuristic else name
