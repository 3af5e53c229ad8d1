"""The texts a level-2 image offers its models: captions, tag names, label and scene context.

Object helpers (copies, renumbering, labels) live in ``levels.objects``; what is here is how
level 2 turns a record into the text its captioner, label assigner and landmark classifier read.
"""

from __future__ import annotations

from grand_pipeline.stage import ImageRecord
from levels.objects import distinct, object_labels


def caption_texts(record: ImageRecord) -> list[str]:
    """The image's short captions, in order."""
    return [str(c["caption"]) for c in record.fields.get("short_captions") or []]


def tag_names(record: ImageRecord) -> list[str]:
    """The image's tag names, best first (level-1 order)."""
    return distinct([t["name"] for t in record.fields.get("tags") or []])


def label_context(record: ImageRecord) -> str:
    """What the label assigner chooses by: the captions, then the tags."""
    parts = caption_texts(record)
    tags = tag_names(record)
    if tags:
        parts.append(", ".join(tags))
    return " ".join(parts)


def scene_text(record: ImageRecord) -> str:
    """What the landmark classifier reads: tags, captions and object labels ("" when none)."""
    words = distinct(tag_names(record) + object_labels(record))
    parts = caption_texts(record)
    if words:
        parts.append(", ".join(words))
    return " ".join(parts)
