"""Declared pyarrow schemas, one per level. Level N+1 reads level N through these.

Every row carries the common columns (identity, ``status``/``error``, provenance). Masks are
COCO RLE structs, never dense bitmaps; boxes are ``[x1, y1, x2, y2]`` in original-image pixels.
"""

from __future__ import annotations

import pyarrow as pa

STATUS_OK = "ok"
STATUS_ERROR = "error"

RLE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
BOX = pa.list_(pa.float64())

BACKEND_USE = pa.struct(
    [
        ("stage", pa.string()),
        ("role", pa.string()),
        ("backend", pa.string()),
        ("model_id", pa.string()),
        ("heuristic", pa.bool_()),
    ]
)
PROVENANCE = pa.struct(
    [
        ("config_hash", pa.string()),
        ("backends", pa.list_(BACKEND_USE)),
        ("prompt_versions", pa.list_(pa.struct([("prompt", pa.string()), ("version", pa.string())]))),
    ]
)

COMMON_FIELDS = [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("shard_id", pa.string(), nullable=False),
    pa.field("file_name", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("error_stage", pa.string()),
    pa.field("provenance", PROVENANCE),
]

TAG = pa.struct([("name", pa.string()), ("score", pa.float32())])

OBJECT = pa.struct(
    [
        ("id", pa.int32()),
        ("bbox", BOX),
        ("labels", pa.list_(pa.string())),
        ("label", pa.string()),
        ("score", pa.float32()),
        ("attributes", pa.list_(pa.string())),
        ("depth", pa.float32()),
        ("segmentation", RLE),
        ("segmentation_source", pa.string()),
        ("models", pa.list_(pa.string())),
    ]
)

FLOATING_ATTRIBUTE = pa.struct(
    [("bbox", BOX), ("description", pa.string()), ("score", pa.float32())]
)

LEVEL1_FIELDS = [
    pa.field("tags", pa.list_(TAG)),
    pa.field("objects", pa.list_(OBJECT)),
    pa.field("floating_objects", pa.list_(OBJECT)),
    pa.field("floating_attributes", pa.list_(FLOATING_ATTRIBUTE)),
    pa.field("depth_source", pa.string()),
]

_LEVEL_FIELDS: dict[int, list[pa.Field]] = {1: LEVEL1_FIELDS}


def level_schema(level: int) -> pa.Schema:
    """The declared schema of ``level``; raises KeyError naming the levels that exist."""
    if level not in _LEVEL_FIELDS:
        raise KeyError(f"no schema for level {level}; levels: {sorted(_LEVEL_FIELDS)}")
    return pa.schema(COMMON_FIELDS + _LEVEL_FIELDS[level])


def declared_levels() -> list[int]:
    return sorted(_LEVEL_FIELDS)


def register_level_fields(level: int, fields: list[pa.Field]) -> None:
    """Levels 2-4 declare their columns here when they are added."""
    _LEVEL_FIELDS[level] = fields
