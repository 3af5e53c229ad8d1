"""DepthStage: one relative depth value per object, from a depth map of the whole image.

The value is the median of the map inside the object's mask (the reference used the box, which
mixes in background pixels for thin or hollow objects); an object without a mask falls back to its
box. The masks are the record's ``ObjectMasks`` (made once by the mask stage), and the median is
numpy's, taken inside each mask's tight box (``geometry.boxed.median_depth``). The full map is not
stored, only ``depth_lowres``: an area-averaged copy whose longest side is ``LOWRES_SIDE`` cells,
from which level 2 gives a depth to the objects it creates. Level 3 only needs per-object values,
ordered within an image.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from grand_pipeline.geometry.boxed import median_depth
from grand_pipeline.geometry.depth import area_mean, grid_size
from grand_pipeline.models.roles import DepthEstimator
from grand_pipeline.schemas import DEPTH_GRID
from grand_pipeline.stage import ImageRecord, Stage
from levels.level1.object_masks import ObjectMasks, device_of
from levels.objects import all_objects, backend_source, image_size, object_boxes, round_score

logger = logging.getLogger(__name__)

#: Longest side of ``depth_lowres`` in cells: 64 x 48 float32 is 12 KB per 4:3 image, and a cell
#: of a 1500 x 2250 SA-1B image is ~35 px, finer than the objects that need it.
LOWRES_SIDE = 64


def lowres_map(depth_map: np.ndarray) -> dict[str, Any]:
    """The ``depth_lowres`` struct of a full-resolution (H, W) map."""
    height, width = grid_size(depth_map.shape[0], depth_map.shape[1], longest=LOWRES_SIDE)
    cells = area_mean(depth_map, (height, width)).astype(np.float32)
    # NaN cells (no finite pixel) are kept as NaN: level 2 gives them no weight.
    return {"height": height, "width": width, "values": cells.reshape(-1).tolist()}


class DepthStage(Stage):
    """Fills ``depth`` of every object dict; provides ``depth_source`` and ``depth_lowres``."""

    name: ClassVar[str] = "depth"
    requires: ClassVar[dict[str, str]] = {
        "objects": "voted objects (with masks)",
        "floating_objects": "floating objects (with masks)",
        "image": "decoded RGB image",
    }
    provides: ClassVar[dict[str, pa.DataType | None]] = {
        "depth_source": pa.string(),
        "depth_lowres": DEPTH_GRID,
    }
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
            if objects:
                # The same masks the mask stage made (decoded once, on the actor's device).
                store = ObjectMasks.of(record, device_of(backend))
                masks = store.masks([obj.get("segmentation") for obj in objects], object_boxes(objects))
                for obj, value in zip(objects, median_depth(depth_map, masks), strict=True):
                    obj["depth"] = round_score(value)  # NaN (empty mask) becomes None
            record.fields["depth_source"] = source
            record.fields["depth_lowres"] = lowres_map(depth_map)
