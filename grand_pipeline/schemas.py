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
        ("weights", pa.string()),  # sha256 of the weights, or hub revision (+ sha256 when small)
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

#: A low-resolution copy of the image's depth map: ``height`` x ``width`` cells (longest side
#: about 64, each the area mean of its pixels), ``values`` row-major. It lets level 2 give a depth
#: to the objects it creates, without keeping the full map.
DEPTH_GRID = pa.struct([("height", pa.int32()), ("width", pa.int32()), ("values", pa.list_(pa.float32()))])

LEVEL1_FIELDS = [
    pa.field("tags", pa.list_(TAG)),
    pa.field("objects", pa.list_(OBJECT)),
    pa.field("floating_objects", pa.list_(OBJECT)),
    pa.field("floating_attributes", pa.list_(FLOATING_ATTRIBUTE)),
    pa.field("depth_source", pa.string()),
    pa.field("depth_lowres", DEPTH_GRID),
]

DETAIL = pa.struct(
    [
        ("phrase", pa.string()),
        ("tokens_positive", pa.list_(pa.int32())),
        ("ids", pa.list_(pa.int32())),
        ("method", pa.string()),
    ]
)
ATTEMPT = pa.struct(
    [
        ("attempt", pa.int32()),
        ("text", pa.string()),
        ("passed", pa.bool_()),
        ("issues", pa.list_(pa.string())),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
    ]
)

LEVEL2_FIELDS = [
    pa.field("short_captions", pa.list_(pa.struct([("caption", pa.string()), ("source", pa.string())]))),
    pa.field(
        "phrases",
        pa.list_(
            pa.struct(
                [
                    ("phrase", pa.string()),
                    ("caption_index", pa.int32()),
                    ("start", pa.int32()),
                    ("end", pa.int32()),
                ]
            )
        ),
    ),
    pa.field(
        "relationships",
        pa.struct(
            [("grounding", pa.list_(pa.struct([("phrase", pa.string()), ("object_ids", pa.list_(pa.int32()))])))]
        ),
    ),
    pa.field(
        "landmark",
        pa.struct([("category", pa.string()), ("fine_category", pa.string()), ("score", pa.float32())]),
    ),
]

LEVEL3_FIELDS = [
    pa.field("scene_graph", pa.string()),
    pa.field(
        "dense_caption",
        pa.struct(
            [
                ("caption", pa.string()),
                ("details", pa.list_(DETAIL)),
                ("verified", pa.bool_()),
                ("attempts", pa.list_(ATTEMPT)),
            ]
        ),
    ),
    pa.field(
        "short_captions_grounded",
        pa.list_(pa.struct([("caption", pa.string()), ("details", pa.list_(DETAIL))])),
    ),
]

LEVEL4_FIELDS = [
    pa.field(
        "additional_context",
        pa.struct([("text", pa.string()), ("verified", pa.bool_()), ("attempts", pa.list_(ATTEMPT))]),
    ),
]

# Rows are cumulative: level N carries every column of level N-1, so level N+1 and the export
# read a single file per shard.
_LEVEL_FIELDS: dict[int, list[pa.Field]] = {
    1: LEVEL1_FIELDS,
    2: LEVEL1_FIELDS + LEVEL2_FIELDS,
    3: LEVEL1_FIELDS + LEVEL2_FIELDS + LEVEL3_FIELDS,
    4: LEVEL1_FIELDS + LEVEL2_FIELDS + LEVEL3_FIELDS + LEVEL4_FIELDS,
}


def level_schema(level: int) -> pa.Schema:
    """The declared schema of ``level``; raises KeyError naming the levels that exist."""
    if level not in _LEVEL_FIELDS:
        raise KeyError(f"no schema for level {level}; levels: {sorted(_LEVEL_FIELDS)}")
    return pa.schema(COMMON_FIELDS + _LEVEL_FIELDS[level])

