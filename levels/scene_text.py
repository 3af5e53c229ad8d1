"""Scene text shared by the LLM levels: which objects a prompt shows and how each is written.

Level 3's scene graph and Level 4's simplified graph show the same object entries
(``label/attribute``) and the same landmark line, so a model reads one vocabulary across levels;
Level 4's relevance check accepts the landmark words named here.
"""

from __future__ import annotations

from typing import Any

from levels.objects import object_label


def select_objects(fields: dict[str, Any], max_objects: int, need_depth: bool) -> list[dict[str, Any]]:
    """The objects a graph shows: objects or else floating objects, attributed first, capped.

    Objects without depth are dropped before the cap (when ``need_depth``) so that the cap counts
    only objects that can be shown.
    """
    pool = list(fields.get("objects") or []) or list(fields.get("floating_objects") or [])
    if need_depth:
        pool = [obj for obj in pool if obj.get("depth") is not None]
    attributed = [obj for obj in pool if obj.get("attributes")]
    plain = [obj for obj in pool if not obj.get("attributes")]
    return (attributed + plain)[:max_objects]


def shown_label(obj: dict[str, Any]) -> str:
    """The object's assigned label, else its first candidate label; underscores read as spaces."""
    return (object_label(obj) or "object").replace("_", " ").strip()


def object_entry(obj: dict[str, Any]) -> str:
    """``label/attribute`` (the first attribute), or the label alone when it adds nothing."""
    label = shown_label(obj)
    attributes = [str(a).strip() for a in obj.get("attributes") or [] if str(a).strip()]
    if attributes and attributes[0].lower() != label.lower():
        return f"{label}/{attributes[0]}"
    return label


def landmark_line(landmark: dict[str, Any] | None) -> str:
    """``Landmark: <category>, <fine category>``; empty when unknown.

    The trailing " scene" of the taxonomy's category names is dropped: Level 4 answers must not
    say "scene", and the word invites talk about the input in Level 3 captions.
    """
    if not landmark or not landmark.get("category"):
        return ""
    category = str(landmark["category"]).removesuffix(" scene").strip()
    fine = str(landmark.get("fine_category") or "").strip()
    return f"Landmark: {category}, {fine}" if fine else f"Landmark: {category}"


def landmark_names(landmark: dict[str, Any] | None) -> list[str]:
    """The landmark words a caption may legitimately use ("road", "airport")."""
    if not landmark:
        return []
    names = [
        str(landmark.get("category") or "").removesuffix(" scene"),
        str(landmark.get("fine_category") or ""),
    ]
    return [n.lower() for n in names if n.strip()]
