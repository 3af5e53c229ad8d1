"""What a level is: its number, its ordered stages, how records are prepared and turned into rows.

Levels are written against model roles, schemas and geometry only; the engine drives them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from grand_pipeline.registry import Registry
from grand_pipeline.schemas import level_schema
from grand_pipeline.stage import ImageRecord, Stage


@dataclass(frozen=True)
class LevelSpec:
    number: int
    stages: tuple[type[Stage], ...]
    needs_pixels: bool
    """True when the stages need the decoded image (the source shard is re-read)."""
    to_row: Callable[[ImageRecord], dict[str, Any]]
    """Level-specific columns of one record; error records get the same keys with empty values."""
    from_previous: Callable[[ImageRecord, dict[str, Any]], None] | None = None
    """Copies what this level needs from the level N-1 row into the record (levels >= 2)."""

    @property
    def schema(self) -> pa.Schema:
        return level_schema(self.number)


LEVELS: Registry[LevelSpec] = Registry("level")
