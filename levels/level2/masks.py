"""ObjectMaskStage: a mask and a depth for every object that grounding added or promoted.

Level 1 gives every object it makes a mask and a depth, but the objects made in level 2 from
phrase groundings (``GroundingStage``, docstring point 3) arrive with neither, and captions are
grounded to them in level 3. GLaMM pairs each ``[SEG]`` with a mask, so a grounded phrase without
one is lost as training data. As in the reference's post-processing (HQ-SAM on every object still
without a mask, box prompts), this stage runs the segmenter on the box of every object and
floating object whose ``segmentation`` is None: one call per image, one image embedding.

``segmentation_source`` is ``segmenter:<backend>``, as in level 1. The depth is read from the
level-1 ``depth_lowres`` map (the full map is not kept): the median of its cells under the mask,
each weighted by the mask pixels it holds; the box when the mask is empty. Objects that already
have a mask are left as they are, and so is a depth that is already set.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from grand_pipeline.geometry import rle
from grand_pipeline.geometry.boxes import as_boxes
from grand_pipeline.geometry.depth import depth_grid, lowres_depths
from grand_pipeline.models.roles import Segmenter
from grand_pipeline.schemas import OBJECT
from grand_pipeline.stage import ImageRecord, Stage
from levels.objects import copy_objects

logger = logging.getLogger(__name__)


def object_depths(grid: np.ndarray | None, masks: np.ndarray, boxes: np.ndarray) -> list[float | None]:
    """Depth per mask from the low-resolution map; None where nothing finite covers it."""
    if grid is None:
        return [None] * len(masks)
    return [None if np.isnan(v) else float(v) for v in lowres_depths(grid, masks, boxes)]


class ObjectMaskStage(Stage):
    """Fills ``segmentation``, ``segmentation_source`` and ``depth`` of objects without a mask;
    rewrites ``objects`` and ``floating_objects``."""

    name: ClassVar[str] = "object_masks"
    requires: ClassVar[dict[str, str]] = {
        "image": "decoded RGB image",
        "objects": "objects after grounding",
        "floating_objects": "floating objects after grounding",
        "depth_lowres": "level-1 low-resolution depth map (None: depths stay None)",
    }
    provides: ClassVar[dict[str, pa.DataType | None]] = {
        "objects": pa.list_(OBJECT),
        "floating_objects": pa.list_(OBJECT),
    }
    models: ClassVar[tuple[str, ...]] = ("segmenter",)
    fills: ClassVar[tuple[str, ...]] = ("segmentation", "segmentation_source", "depth")

    def __init__(self, cfg: Any, hub: Any) -> None:
        super().__init__(cfg, hub)
        self.segmenter = self.backend("segmenter", Segmenter)
        self.source = f"segmenter:{self.segmenter.backend}"

    def process(self, records: list[ImageRecord]) -> None:
        for record in records:
            objects, floating = copy_objects(record)
            todo = [obj for obj in objects + floating if obj.get("segmentation") is None]
            if todo:
                self.segment(record, todo)
            # Swapped in only now: a failure above leaves the record as grounding wrote it.
            record.fields["objects"], record.fields["floating_objects"] = objects, floating
            logger.debug("%s: %d objects segmented", record.image_id, len(todo))

    def segment(self, record: ImageRecord, todo: list[dict[str, Any]]) -> None:
        """One segmenter call for ``todo`` (object copies, changed in place)."""
        image = record.pixels
        boxes = as_boxes([obj["bbox"] for obj in todo])
        masks = np.asarray(self.segmenter.segment(image, boxes.astype(np.float32)))
        expected = (len(todo), int(image.shape[0]), int(image.shape[1]))
        if masks.shape != expected:
            raise ValueError(f"segmenter returned masks of shape {masks.shape}, expected {expected}")
        masks = masks.astype(bool, copy=False)
        depths = object_depths(depth_grid(record.fields.get("depth_lowres")), masks, boxes)
        for obj, encoded, depth in zip(todo, rle.encode(masks), depths, strict=True):
            obj["segmentation"] = encoded
            obj["segmentation_source"] = self.source
            if obj.get("depth") is None:
                obj["depth"] = depth
