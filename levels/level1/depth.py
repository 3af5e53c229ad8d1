"""DepthStage: one relative depth value per object, from a depth map of the whole image.

The value is the median of the map inside the object's mask (the reference used the box, which
mixes in background pixels for thin or hollow objects); an object without a mask falls back to its
box. The map itself is not stored: level 3 only needs per-object values, ordered within an image.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import pyarrow as pa

from grand_pipeline.geometry.depth import median_in_masks
from grand_pipeline.models.roles import DepthEstimator
from grand_pipeline.stage import ImageRecord, Stage
from levels.level1.common import all_objects, backend_source, image_size, iter_mask_chunks, round_score

logger = logging.getLogger(__name__)


class DepthStage(Stage):
    """Fills ``depth`` of every object dict; provides ``depth_source``."""

    name: ClassVar[str] = "depth"
    requires: ClassVar[dict[str, str]] = {
        "objects": "voted objects (with masks)",
        "floating_objects": "floating objects (with masks)",
        "image": "decoded RGB image",
    }
    provides: ClassVar[dict[str, pa.DataType | None]] = {"depth_source": pa.string()}
    models: ClassVar[tuple[str, ...]] = ("depth",)
    fills: ClassVar[tuple[str, ...]] = ("depth",)

    def process(self, records: list[ImageRecord]) -> None:
        backend = self.backend("depth", DepthEstimator)
        maps = backend.depth([r.pixels for r in records])
        if len(maps) != len(records):
            raise ValueError(f"depth backend returned {len(maps)} maps for {len(records)} images")
        source = backend_source(backend)
        for record, depth_map in zip(records, maps, strict=True):
            depth_map = np.asarray(depth_map, dtype=np.float32)
            size = image_size(record)
            if depth_map.shape != size:
                raise ValueError(f"depth map of shape {depth_map.shape} for an image of size {size}")
            objects = all_objects(record)
            items = [(obj.get("segmentation"), obj["bbox"]) for obj in objects]
            for start, masks in iter_mask_chunks(items, *size):
                for obj, value in zip(
                    objects[start : start + len(masks)], median_in_masks(depth_map, masks), strict=True
                ):
                    obj["depth"] = round_score(value)  # NaN (empty mask) becomes None
            record.fields["depth_source"] = source
