"""Turn source items into ``ImageRecord``s: decode once per actor, validate SA-1B masks.

Anything wrong with an input (a corrupt JPEG, a bad RLE, a size mismatch, a missing JSON) turns
the record into an error row here, so the level still commits the rest of the shard.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from grand_pipeline.geometry import rle as rle_ops
from grand_pipeline.geometry.boxes import xywh_to_xyxy
from grand_pipeline.models.roles import Region
from grand_pipeline.sources.base import ImageDecodeError, SourceImage, decode_image
from grand_pipeline.stage import ImageRecord


def parse_regions(annotations: list[dict[str, Any]], height: int, width: int) -> list[Region]:
    """SA-1B annotation dicts -> ``Region`` list; raises ValueError naming the bad annotation."""
    regions = []
    for index, ann in enumerate(annotations):
        ann_id = ann.get("id", index) if isinstance(ann, dict) else index
        try:
            seg = ann["segmentation"]
            size = [int(v) for v in seg["size"]]
            if size != [height, width]:
                raise ValueError(f"mask size {size} != image size {[height, width]}")
            rle_ops.area([seg])  # parses the counts; raises InvalidRLE on a broken mask
            counts = seg["counts"]
            counts = counts.decode() if isinstance(counts, bytes) else counts
            box = xywh_to_xyxy(np.asarray([ann["bbox"]], dtype=np.float64))[0]
            score = float(ann.get("predicted_iou", 1.0))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"invalid SA-1B annotation {ann_id}: {type(exc).__name__}: {exc}") from None
        regions.append(
            Region(
                bbox=box.astype(np.float32),
                rle={"size": size, "counts": counts},
                score=score,
                extra={"id": ann_id, "stability_score": ann.get("stability_score")},
            )
        )
    return regions


def record_from_source(item: SourceImage, max_pixels: int, with_pixels: bool = True) -> ImageRecord:
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
    if not with_pixels:
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
