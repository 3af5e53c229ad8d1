"""MaskStage: a COCO RLE mask for every object and floating object.

Order, as in the reference: the SA-1B mask whose box best overlaps the object (IoU >= ``mask_iou``)
first, since those masks are human-verified quality; then one box-prompted segmenter call per
image for everything left. Unlike the reference, a matched mask must also lie mostly inside the
object box (``mask_containment``): for an object that fills most of the frame, a whole-image mask
passes the box-IoU test alone.

Unlike the reference we keep the object's own box when an SA-1B mask is attached. The reference
replaced it with the SAM box, which discards the detector evidence the vote fused; the mask already
carries the region's exact extent, so nothing is lost by keeping both.

Every mask this stage decodes or gets from the segmenter stays in the record's ``ObjectMasks``
(on the segmenter's device), so the attribute and depth stages never decode it again; the
segmenter's masks are encoded to RLE once, here, straight from their crops.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from grand_pipeline.geometry import boxed
from grand_pipeline.geometry.matching import match_boxes
from grand_pipeline.models.roles import Segmenter
from grand_pipeline.stage import ImageRecord, Stage
from levels.level1.object_masks import ObjectMasks, device_of, segment_masks
from levels.objects import all_objects, object_boxes, plain_rle, region_boxes

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
        self.device = device_of(self.segmenter)

    def process(self, records: list[ImageRecord]) -> None:
        for record in records:
            objects = all_objects(record)
            if not objects:
                continue
            store = ObjectMasks.of(record, self.device)
            boxes = object_boxes(objects)
            matched = self.attach_regions(record, objects, boxes, store)
            missing = np.flatnonzero(~matched)
            if len(missing):
                self.segment(record, [objects[i] for i in missing], boxes[missing], store)
            logger.debug("%s: %d sa1b masks, %d segmented", record.image_id, int(matched.sum()), len(missing))

    def attach_regions(
        self, record: ImageRecord, objects: list[dict], boxes: np.ndarray, store: ObjectMasks
    ) -> np.ndarray:
        """Attach the best-overlapping SA-1B mask; returns (N,) bool, True where one was attached."""
        if not record.regions:
            return np.zeros(len(objects), dtype=bool)
        idx, _ = match_boxes(boxes, region_boxes(record.regions), self.cfg.level1.mask_iou)
        hits = np.flatnonzero(idx >= 0)
        if len(hits):
            rles = [record.regions[int(idx[i])].rle for i in hits]
            masks = store.masks(rles, boxes[hits])  # decoded once, kept for the later stages
            spill = boxed.fraction_inside(masks, boxes[hits]) < self.cfg.level1.mask_containment
            idx[hits[spill]] = -1
        for obj, k in zip(objects, idx, strict=True):
            if k >= 0:
                region_rle = record.regions[int(k)].rle
                obj["segmentation"] = plain_rle(region_rle)
                obj["segmentation_source"] = SA1B_SOURCE
                store.alias(obj["segmentation"], region_rle)
        return idx >= 0

    def segment(
        self, record: ImageRecord, objects: list[dict], boxes: np.ndarray, store: ObjectMasks
    ) -> None:
        """One segmenter call for all ``objects`` of the image (one image embedding)."""
        masks = segment_masks(self.segmenter, record.pixels, boxes.astype(np.float32))
        for i, (obj, encoded) in enumerate(zip(objects, boxed.encode(masks), strict=True)):
            obj["segmentation"] = encoded
            obj["segmentation_source"] = self.segmenter_source
            store.put(encoded, masks.take([i]))
