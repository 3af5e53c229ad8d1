"""Level 4: additional context (uses, history, dangers) about the theme of each image.

Reads everything from the level-3 row (no pixels); ``to_row`` gives ``schemas.LEVEL4_FIELDS``.
"""

from __future__ import annotations

from typing import Any

from grand_pipeline.stage import ImageRecord
from levels.base import LEVELS, LevelSpec
from levels.level4.context import AdditionalContextStage

__all__ = ["LEVEL4", "STAGES", "AdditionalContextStage", "to_row"]

STAGES = (AdditionalContextStage,)


def to_row(record: ImageRecord) -> dict[str, Any]:
    """The level-4 column of one record; an error record gets None."""
    context = record.fields.get("additional_context") if record.ok else None
    if context is None:
        return {"additional_context": None}
    return {
        "additional_context": {
            "text": str(context.get("text") or ""),
            "verified": bool(context.get("verified")),
            "attempts": list(context.get("attempts") or []),
        }
    }


LEVEL4 = LevelSpec(number=4, stages=STAGES, needs_pixels=False, to_row=to_row)
LEVELS.register("4")(LEVEL4)
