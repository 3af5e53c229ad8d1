"""MaskStage: a COCO RLE mask for every object and floating object.

Order, as in the reference: the SA-1B mask whose box best overlaps the object (IoU >= ``mask_iou``)
first, since those masks are human-verified quality; then one box-prompted segmenter call per
image for everything left. Unlike the reference, a matched mask must also lie mostly inside the
object box (``mask_containment``): for an object that fills most of the frame, a whole-image mask
passes the box-IoU test alone.

Unlike the reference we keep the object's own box when an SA-1B mask is attached. The reference
replaced it with the SAM box, which discards the detector evidence the vote fused; the mask already
carries the region's exact extent, so nothing is lost by keeping both.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from grand_pipeline.geometry import rle
from grand_pipeline.geometry.matching import fraction_inside, match_boxes
from grand_pipeline.models.roles import Segmenter
from grand_pipeline.stage import ImageRecord, Stage
from levels.level1.common import all_objects, image_size, object_boxes, plain_rle, region_boxes

logger = logging.getLogger(__name__)

SA1B_SOURCE = "sa1b"


class MaskStage(Stage):
    """Fills ``segmentation`` and ``segmentation_source`` of every object dict."""

    name: ClassVar[str] = "masks"
    requires: ClassVar[dict[str, str]] = {
        "objects": "voted objects",
        "floating_objects": "floating objects",
        "image": "decoded RGB image",
        "regions": "SA-1B region proposals (may be empty)",
    }
    provides: ClassVar[dict[str, pa.DataType | None]] = {}
    models: ClassVar[tuple[str, ...]] = ("segmenter",)
    fills: ClassVar[tuple[str, ...]] = ("segmentation", "segmentation_source")

    def __init__(self, cfg: Any, hub: Any) -> None:
        super().__init__(cfg, hub)
        self.segmenter = self.backend("segmenter", Segmenter)
        self.segmenter_source = f"segmenter:{self.segmenter.backend}"

    def process(self, records: list[ImageRecord]) -> None:
        for record in records:
            objects = all_objects(record)
            if not objects:
                continue
            boxes = object_boxes(objects)
            matched = self.attach_regions(record, objects, boxes)
            missing = np.flatnonzero(~matched)
            if len(missing):
                self.segment(record, [objects[i] for i in missing], boxes[missing])
            logger.debug("%s: %d sa1b masks, %d segmented", record.image_id, int(matched.sum()), len(missing))

    def attach_regions(self, record: ImageRecord, objects: list[dict], boxes: np.ndarray) -> np.ndarray:
        """Attach the best-overlapping SA-1B mask; returns (N,) bool, True where one was attached."""
        if not record.regions:
            return np.zeros(len(objects), dtype=bool)
        idx, _ = match_boxes(boxes, region_boxes(record.regions), self.cfg.level1.mask_iou)
        hits = np.flatnonzero(idx >= 0)
        if len(hits):
            masks = rle.decode([record.regions[int(idx[i])].rle for i in hits])
            spill = fraction_inside(masks, boxes[hits]) < self.cfg.level1.mask_containment
            idx[hits[spill]] = -1
        for obj, k in zip(objects, idx, strict=True):
            if k >= 0:
                obj["segmentation"] = plain_rle(record.regions[int(k)].rle)
                obj["segmentation_source"] = SA1B_SOURCE
        return idx >= 0

    def segment(self, record: ImageRecord, objects: list[dict], boxes: np.ndarray) -> None:
        """One segmenter call for all ``objects`` of the image (one image embedding)."""
        masks = np.asarray(self.segmenter.segment(record.pixels, boxes.astype(np.float32)))
        expected = (len(objects), *image_size(record))
        if masks.shape != expected:
            raise ValueError(f"segmenter returned masks of shape {masks.shape}, expected {expected}")
        for obj, encoded in zip(objects, rle.encode(masks), strict=True):
            obj["segmentation"] = encoded
            obj["segmentation_source"] = self.segmenter_source
