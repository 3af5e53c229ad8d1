"""Level 1: tags, the detector ensemble and its vote, masks, attributes and depth per object.

Stages run in the order of ``STAGES``; ``to_row`` turns a finished record into the level-1
columns of ``schemas.LEVEL1_FIELDS``.
"""

from __future__ import annotations

from typing import Any

from grand_pipeline.stage import ImageRecord
from levels.base import LEVELS, LevelSpec
from levels.level1.attributes import AttributeStage
from levels.level1.depth import DepthStage
from levels.level1.detect import DetectStage
from levels.level1.masks import MaskStage
from levels.level1.nms import NmsStage
from levels.level1.tags import TagStage
from levels.level1.vote import VoteStage
from levels.objects import object_row, round_box, round_score

__all__ = [
    "LEVEL1",
    "STAGES",
    "AttributeStage",
    "DepthStage",
    "DetectStage",
    "MaskStage",
    "NmsStage",
    "TagStage",
    "VoteStage",
    "to_row",
]

STAGES = (TagStage, DetectStage, NmsStage, VoteStage, MaskStage, AttributeStage, DepthStage)


def to_row(record: ImageRecord) -> dict[str, Any]:
    """The level-1 columns of one record; an error record gets empty lists and None."""
    if not record.ok:
        return {
            "tags": [],
            "objects": [],
            "floating_objects": [],
            "floating_attributes": [],
            "depth_source": None,
            "depth_lowres": None,
        }
    fields = record.fields
    return {
        "tags": [{"name": str(t["name"]), "score": round_score(t["score"])} for t in fields.get("tags", [])],
        "objects": [object_row(o) for o in fields.get("objects", [])],
        "floating_objects": [object_row(o) for o in fields.get("floating_objects", [])],
        "floating_attributes": [
            {
                "bbox": round_box(a["bbox"]),
                "description": str(a["description"]),
                "score": round_score(a["score"]),
            }
            for a in fields.get("floating_attributes", [])
        ],
        "depth_source": fields.get("depth_source"),
        "depth_lowres": fields.get("depth_lowres"),
    }


LEVEL1 = LevelSpec(number=1, stages=STAGES, needs_pixels=True, to_row=to_row)
LEVELS.register("1")(LEVEL1)
