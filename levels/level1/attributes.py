"""AttributeStage: a short attribute phrase per object, and floating attributes.

Every object and floating object is described (box + mask). Region proposals that no object
covers are described too and kept as ``floating_attributes``: the lite analogue of the
reference's GRiT boxes that matched no detection. Objects and leftover regions of one image go
to the region captioner together, so the captioner sees each image once.

The masks come from the record's ``ObjectMasks`` (decoded once, on the actor's device, as the
crops of their tight boxes) and go to the captioner as a ``BoxedMasks``: it reads as an (N, H, W)
mask array, and the crop-based captioners cut their crops from it on the device.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from grand_pipeline.geometry.boxes import box_area
from grand_pipeline.geometry.matching import unmatched
from grand_pipeline.models.roles import Region, RegionCaptioner
from grand_pipeline.schemas import FLOATING_ATTRIBUTE
from grand_pipeline.stage import ImageRecord, Stage
from levels.level1.object_masks import ObjectMasks, device_of
from levels.objects import (
    all_objects,
    image_size,
    object_boxes,
    region_boxes,
    round_box,
    round_score,
)

logger = logging.getLogger(__name__)


def leftover_regions(
    regions: list[Region], objects: list[dict], height: int, width: int, min_area: float, iou: float
) -> list[Region]:
    """Regions of box area >= ``min_area`` x image area that no object matches at IoU >= ``iou``.

    Box area, not mask area: the same size rule the region-tagger detector applies, so a region
    too small to be classified there is not described here either.
    """
    if not regions:
        return []
    boxes = region_boxes(regions)
    big = box_area(boxes) >= min_area * height * width
    free = unmatched(object_boxes(objects), boxes, iou)
    return [region for region, keep in zip(regions, big & free, strict=True) if keep]


def largest_regions(regions: list[Region], limit: int) -> list[Region]:
    """The ``limit`` regions of largest box area, in their given order (a stable, deterministic pick).

    Each described region costs a captioner crop; without a cap an SA-1B file with 20,000 masks
    spends a quarter of an hour here. Box area, like ``leftover_regions`` and the region tagger.
    """
    if len(regions) <= limit:
        return regions
    boxes = region_boxes(regions)
    keep = np.sort(np.argsort(-box_area(boxes), kind="stable")[: max(0, limit)])
    return [regions[int(i)] for i in keep]


class AttributeStage(Stage):
    """Fills ``attributes`` of every object dict; provides ``floating_attributes``."""

    name: ClassVar[str] = "attributes"
    requires: ClassVar[dict[str, str]] = {
        "objects": "voted objects (with masks)",
        "floating_objects": "floating objects (with masks)",
        "image": "decoded RGB image",
        "regions": "SA-1B region proposals (may be empty)",
    }
    provides: ClassVar[dict[str, pa.DataType | None]] = {"floating_attributes": pa.list_(FLOATING_ATTRIBUTE)}
    models: ClassVar[tuple[str, ...]] = ("region_captioner",)
    fills: ClassVar[tuple[str, ...]] = ("attributes",)

    def process(self, records: list[ImageRecord]) -> None:
        level1 = self.cfg.level1
        for record in records:
            height, width = image_size(record)
            objects = all_objects(record)
            extra = leftover_regions(
                record.regions, objects, height, width, level1.region_min_area, level1.floating_attribute_iou
            )
            capped = largest_regions(extra, level1.max_regions)
            if len(capped) < len(extra):
                logger.info(
                    "%s: %d leftover regions, describing the %d largest (level1.max_regions); %d dropped",
                    record.image_id,
                    len(extra),
                    len(capped),
                    len(extra) - len(capped),
                )
            extra = capped
            # The leftover regions' own RLE dicts: their masks are only cropped, never stored.
            items = [(obj.get("segmentation"), obj["bbox"]) for obj in objects]
            items += [(r.rle, r.bbox) for r in extra]
            phrases = self.describe(record, items)
            for obj, phrase in zip(objects, phrases[: len(objects)], strict=True):
                obj["attributes"] = [phrase] if phrase else []
            record.fields["floating_attributes"] = [
                {"bbox": round_box(r.bbox), "description": phrase, "score": round_score(r.score)}
                for r, phrase in zip(extra, phrases[len(objects) :], strict=True)
                if phrase
            ]
            logger.debug("%s: %d described, %d floating attributes", record.image_id, len(items), len(extra))

    def describe(self, record: ImageRecord, items: list[tuple[Any, Any]]) -> list[str]:
        """One phrase per (segmentation, box) item, from one captioner call for the image."""
        captioner = self.backend("region_captioner", RegionCaptioner)
        if not items:
            return []
        boxes = np.stack([np.asarray(box, dtype=np.float64).reshape(4) for _, box in items])
        store = ObjectMasks.of(record, device_of(captioner))
        # Any: the role's type says dense (N, H, W); BoxedMasks reads as one (see geometry.boxed).
        masks: Any = store.masks([seg for seg, _ in items], boxes)
        out = captioner.describe_regions(record.pixels, boxes.astype(np.float32), masks)
        if len(out) != len(items):
            raise ValueError(f"region captioner returned {len(out)} phrases for {len(items)} boxes")
        return [str(p).strip() for p in out]
