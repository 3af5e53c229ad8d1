"""Turn source items into ``ImageRecord``s: decode once per actor, validate SA-1B masks.

Anything wrong with an input (a corrupt JPEG, a bad RLE, a size mismatch, a missing JSON) turns
the record into an error row here, so the level still commits the rest of the shard.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from grand_pipeline.geometry import rle as rle_ops
from grand_pipeline.geometry.boxes import xywh_to_xyxy
from grand_pipeline.models.roles import Region
from grand_pipeline.sources.base import ImageDecodeError, SourceImage, decode_image, error_text, short_repr
from grand_pipeline.stage import ImageRecord


class _BadAnnotation(ValueError):
    """One annotation field that is not what SA-1B says it is."""


def _number(value: Any) -> float:
    """A finite real number (JSON ints and floats; not bools, not Infinity/NaN, not 400 digits)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _BadAnnotation(f"not a number: {short_repr(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise _BadAnnotation(f"number out of range: {short_repr(value)}") from None
    if not math.isfinite(number):
        raise _BadAnnotation(f"number is not finite: {short_repr(value)}")
    return number


def _bbox(value: Any) -> np.ndarray:
    if not isinstance(value, list) or len(value) != 4:
        raise _BadAnnotation(f"bbox must have 4 numbers, got {short_repr(value)}")
    try:
        x, y, w, h = (_number(v) for v in value)
    except _BadAnnotation as exc:
        raise _BadAnnotation(f"bbox must have 4 finite numbers: {exc}") from None
    if w < 0 or h < 0:
        raise _BadAnnotation(f"bbox width/height must be >= 0, got {short_repr(value)}")
    return xywh_to_xyxy(np.asarray([[x, y, w, h]], dtype=np.float64))[0]


def _size(value: Any) -> list[int]:
    if not (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise _BadAnnotation(f"segmentation size must be 2 positive integers, got {short_repr(value)}")
    return list(value)


def _region(ann: Any, ann_id: Any, height: int, width: int) -> Region:
    if not isinstance(ann, dict):
        raise _BadAnnotation(f"not an object: {short_repr(ann)}")
    seg = ann.get("segmentation")
    if not isinstance(seg, dict) or "counts" not in seg:
        raise _BadAnnotation("missing segmentation {size, counts}")
    size = _size(seg.get("size"))
    if size != [height, width]:
        raise _BadAnnotation(f"mask size {size} != image size {[height, width]}")
    box = _bbox(ann.get("bbox"))
    score = _number(ann.get("predicted_iou", 1.0))
    rle_ops.area([seg])  # parses the counts; raises InvalidRLE on a broken mask
    counts = seg["counts"]
    counts = counts.decode() if isinstance(counts, bytes) else counts
    return Region(
        bbox=box.astype(np.float32),
        rle={"size": size, "counts": counts},
        score=score,
        extra={"id": ann_id, "stability_score": ann.get("stability_score")},
    )


def parse_regions(annotations: list[dict[str, Any]], height: int, width: int) -> list[Region]:
    """SA-1B annotation dicts -> ``Region`` list; raises ValueError naming the bad annotation.

    The fields are checked explicitly; the except clause is the net for what a hostile value can
    still raise deeper down (an RLE with a 400-digit run, counts nested a million deep): anything
    escaping here would fail the whole unit, good neighbours included, on every retry.
    """
    regions = []
    for index, ann in enumerate(annotations):
        ann_id = ann.get("id", index) if isinstance(ann, dict) else index
        try:
            regions.append(_region(ann, ann_id, height, width))
        except _BadAnnotation as exc:
            raise ValueError(f"invalid SA-1B annotation {short_repr(ann_id)}: {exc}") from None
        except (ArithmeticError, LookupError, RecursionError, TypeError, ValueError) as exc:
            raise ValueError(
                f"invalid SA-1B annotation {short_repr(ann_id)}: {type(exc).__name__}: {error_text(exc)}"
            ) from None
    return regions


def record_from_source(item: SourceImage, max_pixels: int) -> ImageRecord:
    record = ImageRecord(
        image_id=item.image_id,
        shard_id=item.shard_id,
        file_name=item.file_name,
        width=item.width or 0,
        height=item.height or 0,
    )
    if item.error:
        record.fail("read", item.error)
        return record
    try:
        image = decode_image(item.data or b"", max_pixels)
    except ImageDecodeError as exc:
        record.fail("decode", str(exc))
        return record
    height, width = image.shape[:2]
    if item.width and (item.width, item.height) != (width, height):
        record.fail("decode", f"annotation says {item.width}x{item.height}, image is {width}x{height}")
        return record
    record.image, record.width, record.height = image, width, height
    if item.annotations:
        try:
            record.regions = parse_regions(item.annotations, height, width)
        except ValueError as exc:
            record.fail("read", str(exc))
    return record


def micro_batches(records: Iterator[ImageRecord], size: int) -> Iterator[list[ImageRecord]]:
    batch: list[ImageRecord] = []
    for record in records:
        batch.append(record)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
