"""SceneGraphStage: Levels 1-2 organised into the hierarchical text the dense-caption LLM reads.

Objects (or the floating objects of an image that has none) are capped at ``max_objects``,
attributed ones first; objects without depth cannot be layered and are dropped. Depth is
normalised per image (0 = nearest), cut into layers, and objects close to each other inside a
layer are grouped. The grouping radius is a fraction of the image diagonal, not the reference's
200 px, so that the same photo groups the same way at any resolution.

The rendering helpers are shared with Level 4, which shows a flat list of the same entries.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from grand_pipeline.geometry.boxes import as_boxes
from grand_pipeline.geometry.depth import (
    LAYER_NAMES,
    UNKNOWN_LAYER,
    depth_layers,
    normalise_depth,
    proximity_groups,
)
from grand_pipeline.stage import ImageRecord, Stage

logger = logging.getLogger(__name__)

Layout = list[tuple[str, list[list[dict[str, Any]]]]]
"""(layer name, groups of object dicts) per non-empty layer, nearest layer first."""


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


def object_label(obj: dict[str, Any]) -> str:
    """The object's assigned label, else its first candidate label; underscores read as spaces."""
    labels = obj.get("labels") or []
    label = obj.get("label") or (labels[0] if labels else "object")
    return str(label).replace("_", " ").strip()


def object_entry(obj: dict[str, Any]) -> str:
    """``label/attribute`` (the first attribute), or the label alone when it adds nothing."""
    label = object_label(obj)
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


def layout(
    objects: list[dict[str, Any]], thresholds: list[float], radius: float, size: tuple[int, int]
) -> Layout:
    """(layer name, [[object, ...] per group]) in near-to-far order, groups in seed order."""
    if not objects:
        return []
    layers = depth_layers(normalise_depth([float(o["depth"]) for o in objects]), tuple(thresholds))
    boxes = as_boxes([o["bbox"] for o in objects])
    groups = proximity_groups(boxes, layers, size, radius_frac=radius)
    out = []
    for layer in (*LAYER_NAMES, UNKNOWN_LAYER):
        members: dict[int, list[dict[str, Any]]] = {}
        for obj, name, group in zip(objects, layers, groups, strict=True):
            if name == layer:
                members.setdefault(int(group), []).append(obj)
        if members:
            out.append((layer, [members[g] for g in sorted(members)]))
    return out


def image_extent(record: ImageRecord, objects: list[dict[str, Any]]) -> tuple[int, int]:
    """(H, W) of the image; the boxes' extent when a row lacks its size."""
    if (record.height or 0) > 0 and (record.width or 0) > 0:
        return int(record.height), int(record.width)
    if not objects:
        return 1, 1
    boxes = as_boxes([o["bbox"] for o in objects])
    return max(1, int(np.ceil(boxes[:, 3].max()))), max(1, int(np.ceil(boxes[:, 2].max())))


def object_names(obj: dict[str, Any]) -> list[str]:
    """What the graph says an object is called: its label, candidate labels and attributes."""
    names = [object_label(obj)] + [str(v).replace("_", " ") for v in obj.get("labels") or []]
    return names + [str(v) for v in obj.get("attributes") or []]


def render_graph(fields: dict[str, Any], layered: Layout) -> tuple[str, list[str]]:
    """The scene-graph text, and the names it mentions (lower case, unique) for the caption check.

    The names are the labels and synonyms of shown objects and of relationship targets,
    attributes, relationship phrases (grounded in objects) and the landmark. Short captions are
    left out on purpose: they are ungrounded text, and the check is about what detections support.
    """
    lines: list[str] = []
    names: list[str] = []
    group_of: dict[int, int] = {}
    number = 0
    for layer, groups in layered:
        lines.append(f"{layer.capitalize()}:")
        for members in groups:
            number += 1  # numbered in reading order, not in proximity_groups' seed order
            group_of.update({int(obj["id"]): number for obj in members})
            lines.append(f"Group {number}: " + ", ".join(object_entry(obj) for obj in members))
            names += [n for obj in members for n in object_names(obj)]
    captions = [str(c.get("caption") or "").strip() for c in fields.get("short_captions") or []]
    if any(captions):
        lines += ["Short captions:"] + [f"- {c}" for c in captions if c]
    relations = relationship_lines(fields, group_of, names)
    if relations:
        lines += ["Relationships:"] + relations
    landmark = landmark_line(fields.get("landmark"))
    if landmark:
        lines.append(landmark)
        names += landmark_names(fields.get("landmark"))
    unique = dict.fromkeys(n.strip().lower() for n in names if n.strip())
    return "\n".join(lines), list(unique)


def relationship_lines(fields: dict[str, Any], group_of: dict[int, int], names: list[str]) -> list[str]:
    """``- <phrase> -> label (group k), ...`` per grounded phrase; a target the graph does not
    show (no depth, over the cap) gets its label only. Mentioned names are added to ``names``."""
    by_id = {int(o["id"]): o for key in ("objects", "floating_objects") for o in fields.get(key) or []}
    lines = []
    for item in (fields.get("relationships") or {}).get("grounding") or []:
        phrase = str(item.get("phrase") or "").strip()
        if not phrase:
            continue
        names.append(phrase)
        targets = []
        for oid in item.get("object_ids") or []:
            obj = by_id.get(int(oid))
            if obj is None:
                continue
            names.extend(object_names(obj))
            group = group_of.get(int(oid))
            targets.append(f"{object_label(obj)} (group {group})" if group else object_label(obj))
        lines.append(f"- {phrase} -> {', '.join(targets)}" if targets else f"- {phrase}")
    return lines


def lead_phrase(objects: list[dict[str, Any]], person_labels: list[str]) -> str:
    """"A <label>" for the caption opener ("" for no objects): a person if the graph shows one,
    since captions lead with people, else the most confident shown object."""
    if not objects:
        return ""
    people = {p.lower() for p in person_labels}
    best = max(
        objects,
        key=lambda o: (object_label(o).lower() in people, float(o.get("score") or 0.0), -int(o["id"])),
    )
    label = object_label(best)
    return f"{'An' if label[:1].lower() in 'aeiou' else 'A'} {label}"


class SceneGraphStage(Stage):
    """Provides ``scene_graph`` (text) and, in memory, ``scene_objects`` for the caption check
    and ``scene_lead`` for the caption opener."""

    name: ClassVar[str] = "scene_graph"
    requires: ClassVar[dict[str, str]] = {
        "objects": "level-2 objects (labels, attributes, depth)",
        "floating_objects": "level-2 floating objects",
        "short_captions": "level-2 short captions",
        "relationships": "level-2 grounded phrases",
        "landmark": "level-2 landmark category",
    }
    provides: ClassVar[dict[str, pa.DataType | None]] = {
        "scene_graph": pa.string(),
        "scene_objects": None,
        "scene_lead": None,
    }

    def process(self, records: list[ImageRecord]) -> None:
        cfg = self.cfg.level3
        for record in records:
            objects = select_objects(record.fields, cfg.max_objects, need_depth=True)
            layered = layout(objects, cfg.layer_thresholds, cfg.group_radius, image_extent(record, objects))
            text, names = render_graph(record.fields, layered)
            record.fields["scene_graph"] = text
            record.fields["scene_objects"] = names
            record.fields["scene_lead"] = lead_phrase(objects, self.cfg.level1.person.labels)
            logger.debug("%s: scene graph of %d objects, %d chars", record.image_id, len(objects), len(text))
