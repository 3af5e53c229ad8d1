"""Level 2: short captions, phrases, phrase grounding, masks for new objects, labels and landmark.

Stages run in the order of ``STAGES``. ``to_row`` returns the level-2 columns of
``schemas.LEVEL2_FIELDS`` plus ``objects`` and ``floating_objects``, which level 2 rewrites
(assigned labels, objects added by grounding and their masks, promotions, renumbered ids); the
other level-1 columns travel on unchanged (the engine carries them).
"""

from __future__ import annotations

from typing import Any

from grand_pipeline.stage import ImageRecord
from levels.base import LEVELS, LevelSpec
from levels.level2.captions import CaptionStage
from levels.level2.grounding import GroundingStage
from levels.level2.labels import LabelStage
from levels.level2.landmark import LandmarkStage
from levels.level2.masks import ObjectMaskStage
from levels.level2.phrases import PhraseStage
from levels.objects import object_row

__all__ = [
    "LEVEL2",
    "STAGES",
    "CaptionStage",
    "GroundingStage",
    "LabelStage",
    "LandmarkStage",
    "ObjectMaskStage",
    "PhraseStage",
    "to_row",
]

STAGES = (CaptionStage, PhraseStage, GroundingStage, ObjectMaskStage, LabelStage, LandmarkStage)


def objects_columns(record: ImageRecord) -> dict[str, Any]:
    """``objects`` and ``floating_objects`` as Arrow-ready rows.

    Written for error records too: stages swap in whole new lists only when they succeed, so
    an error record holds the objects as the last successful stage left them, ids consistent.
    """
    return {
        key: [object_row(o) for o in record.fields.get(key) or []] for key in ("objects", "floating_objects")
    }


def to_row(record: ImageRecord) -> dict[str, Any]:
    """The level-2 columns of one record (plus objects); an error record gets empty lists and None."""
    if not record.ok:
        return {
            "short_captions": [],
            "phrases": [],
            "relationships": None,
            "landmark": None,
            **objects_columns(record),
        }
    fields = record.fields
    landmark = fields.get("landmark")
    return {
        "short_captions": [
            {"caption": str(c["caption"]), "source": str(c["source"])}
            for c in fields.get("short_captions") or []
        ],
        "phrases": [
            {
                "phrase": str(p["phrase"]),
                "caption_index": int(p["caption_index"]),
                "start": int(p["start"]),
                "end": int(p["end"]),
            }
            for p in fields.get("phrases") or []
        ],
        "relationships": {
            "grounding": [
                {"phrase": str(g["phrase"]), "object_ids": [int(i) for i in g["object_ids"]]}
                for g in (fields.get("relationships") or {}).get("grounding") or []
            ]
        },
        "landmark": None if landmark is None else dict(landmark),
        **objects_columns(record),
    }


LEVEL2 = LevelSpec(number=2, stages=STAGES, needs_pixels=True, to_row=to_row)
LEVELS.register("2")(LEVEL2)
