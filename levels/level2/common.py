"""Helpers shared by the level-2 stages: the texts an image offers, object copies, id renumbering.

Level-1 helpers (object iteration, rounding) are reused from ``levels.level1.common``; what is
here is specific to level 2, where objects can be added, promoted and renumbered.
"""

from __future__ import annotations

import logging
from typing import Any

from grand_pipeline.stage import ImageRecord
from levels.level1.common import OBJECT_FIELDS

logger = logging.getLogger(__name__)


def distinct(items: list[Any]) -> list[str]:
    """Non-empty stripped strings of ``items``, duplicates removed, first-seen order."""
    return list(dict.fromkeys(str(i).strip() for i in items if i is not None and str(i).strip()))


def caption_texts(record: ImageRecord) -> list[str]:
    """The image's short captions, in order."""
    return [str(c["caption"]) for c in record.fields.get("short_captions") or []]


def tag_names(record: ImageRecord) -> list[str]:
    """The image's tag names, best first (level-1 order)."""
    return distinct([t["name"] for t in record.fields.get("tags") or []])


def object_label(obj: dict[str, Any]) -> str | None:
    """An object's label, or its first candidate label when none was chosen."""
    if obj.get("label"):
        return str(obj["label"])
    labels = obj.get("labels") or []
    return str(labels[0]) if labels else None


def object_labels(record: ImageRecord, keys: tuple[str, ...] = OBJECT_FIELDS) -> list[str]:
    """Distinct labels of the objects under ``keys`` (objects, then floating objects by default)."""
    return distinct([object_label(obj) for key in keys for obj in record.fields.get(key) or []])


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


def copy_object(obj: dict[str, Any]) -> dict[str, Any]:
    """A copy whose lists can be changed without touching the original.

    Stages work on copies and swap them in at the end, so a stage that fails half-way leaves
    the record's objects as the previous stage wrote them, never half-updated.
    """
    out = dict(obj)
    for key in ("labels", "attributes", "models", "bbox"):
        if out.get(key) is not None:
            out[key] = list(out[key])
    return out


def copy_objects(record: ImageRecord) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Copies of the record's (objects, floating objects)."""
    objects = [copy_object(o) for o in record.fields.get("objects") or []]
    floating = [copy_object(o) for o in record.fields.get("floating_objects") or []]
    return objects, floating


def renumber(objects: list[dict[str, Any]], floating: list[dict[str, Any]]) -> dict[int, int]:
    """Give objects then floating objects ids 0..N-1 in list order; returns old id -> new id.

    Old ids must be unique (level-1 ids are; level 2 gives new objects ids above them), so the
    returned map can remap every id that points at an object, e.g. in ``relationships``.
    """
    mapping: dict[int, int] = {}
    for new_id, obj in enumerate(objects + floating):
        old = int(obj["id"])
        if old in mapping:
            raise ValueError(f"object id {old} is used twice")
        mapping[old] = new_id
        obj["id"] = new_id
    return mapping


def next_free_id(objects: list[dict[str, Any]], floating: list[dict[str, Any]]) -> int:
    """An id above every id in use, for objects made before the final renumbering."""
    return max((int(o["id"]) for o in objects + floating), default=-1) + 1
