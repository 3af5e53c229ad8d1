"""Level 3: the scene graph, the verified dense caption, and the grounding of every caption.

Stages run in the order of ``STAGES``; ``to_row`` turns a finished record into the level-3
columns of ``schemas.LEVEL3_FIELDS``. Level 3 reads everything from the level-2 row (no pixels).
"""

from __future__ import annotations

from typing import Any

from grand_pipeline.stage import ImageRecord
from levels.base import LEVELS, LevelSpec
from levels.level3.dense_caption import DenseCaptionStage
from levels.level3.ground import GroundCaptionsStage
from levels.level3.scene_graph import SceneGraphStage

__all__ = ["LEVEL3", "STAGES", "DenseCaptionStage", "GroundCaptionsStage", "SceneGraphStage", "to_row"]

STAGES = (SceneGraphStage, DenseCaptionStage, GroundCaptionsStage)


def detail_row(detail: dict[str, Any]) -> dict[str, Any]:
    """One DETAIL as plain Arrow-ready values."""
    return {
        "phrase": str(detail["phrase"]),
        "tokens_positive": [int(v) for v in detail["tokens_positive"]],
        "ids": [int(v) for v in detail.get("ids") or []],
        "method": str(detail["method"]),
    }


def dense_row(dense: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``dense_caption`` struct; attempts are already plain ATTEMPT dicts."""
    if dense is None:
        return None
    return {
        "caption": str(dense.get("caption") or ""),
        "details": [detail_row(d) for d in dense.get("details") or []],
        "verified": bool(dense.get("verified")),
        "attempts": list(dense.get("attempts") or []),
    }


def to_row(record: ImageRecord) -> dict[str, Any]:
    """The level-3 columns of one record; an error record gets "", None and []."""
    if not record.ok:
        return {"scene_graph": "", "dense_caption": None, "short_captions_grounded": []}
    fields = record.fields
    return {
        "scene_graph": str(fields.get("scene_graph") or ""),
        "dense_caption": dense_row(fields.get("dense_caption")),
        "short_captions_grounded": [
            {"caption": str(item["caption"]), "details": [detail_row(d) for d in item.get("details") or []]}
            for item in fields.get("short_captions_grounded") or []
        ],
    }


LEVEL3 = LevelSpec(number=3, stages=STAGES, needs_pixels=False, to_row=to_row)
LEVELS.register("3")(LEVEL3)
