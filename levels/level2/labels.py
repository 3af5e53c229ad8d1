"""LabelStage: one ``label`` per object among its candidate ``labels`` (the reference's EVA-CLIP step).

Only objects (and floating objects) with more than one distinct candidate are sent to the label
assigner, all of one image in one call, with the image's captions and tags as context. The rest
keep their label. Runs after grounding so that objects promoted there, which by definition have
several candidates, get a label chosen too.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from grand_pipeline.models.roles import LabelAssigner
from grand_pipeline.schemas import OBJECT
from grand_pipeline.stage import ImageRecord, Stage
from levels.level2.common import label_context
from levels.objects import copy_objects, distinct, object_boxes

logger = logging.getLogger(__name__)


class LabelStage(Stage):
    """Sets ``label`` of every ambiguous object; rewrites ``objects`` and ``floating_objects``."""

    name: ClassVar[str] = "labels"
    requires: ClassVar[dict[str, str]] = {
        "image": "decoded RGB image",
        "objects": "objects after grounding",
        "floating_objects": "floating objects after grounding",
        "short_captions": "short captions (context)",
        "tags": "level-1 tags (context)",
    }
    provides: ClassVar[dict[str, pa.DataType | None]] = {
        "objects": pa.list_(OBJECT),
        "floating_objects": pa.list_(OBJECT),
    }
    models: ClassVar[tuple[str, ...]] = ("label_assigner",)

    def process(self, records: list[ImageRecord]) -> None:
        assigner = self.backend("label_assigner", LabelAssigner)
        for record in records:
            objects, floating = copy_objects(record)
            ambiguous: list[tuple[dict[str, Any], list[str]]] = []
            for obj in objects + floating:
                candidates = distinct(obj.get("labels") or [])
                if len(candidates) > 1:
                    ambiguous.append((obj, candidates))
            if ambiguous:
                boxes = object_boxes([obj for obj, _ in ambiguous]).astype(np.float32)
                candidate_lists = [c for _, c in ambiguous]
                chosen = assigner.assign(record.pixels, boxes, candidate_lists, label_context(record))
                if len(chosen) != len(ambiguous):
                    raise ValueError(
                        f"label assigner returned {len(chosen)} labels for {len(ambiguous)} boxes"
                    )
                for (obj, cands), label in zip(ambiguous, chosen, strict=True):
                    if label not in cands:
                        raise ValueError(f"label assigner chose {label!r}, not one of {cands}")
                    obj["label"] = label
            record.fields["objects"], record.fields["floating_objects"] = objects, floating
            logger.debug("%s: %d labels assigned", record.image_id, len(ambiguous))
