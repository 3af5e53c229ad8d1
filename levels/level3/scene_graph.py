"""SceneGraphStage: Levels 1-2 organised into the hierarchical text the dense-caption LLM reads.

Objects (or the floating objects of an image that has none) are capped at ``max_objects``,
attributed ones first; objects without depth cannot be layered and are dropped. Depth is
normalised per image (0 = nearest), cut into layers, and objects close to each other inside a
layer are grouped. The grouping radius is a fraction of the image diagonal, not the reference's
200 px, so that the same photo groups the same way at any resolution.

The entry and landmark renderers (:mod:`levels.scene_text`) are shared with Level 4, which shows
a flat list of the same entries.
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
from levels.scene_text import landmark_line, landmark_names, object_entry, select_objects, shown_label

logger = logging.getLogger(__name__)

Layout = list[tuple[str, list[list[dict[str, Any]]]]]
"""(layer name, groups of object dicts) per non-empty layer, nearest layer first."""


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
    names = [shown_label(obj)] + [str(v).replace("_", " ") for v in obj.get("labels") or []]
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
            targets.append(f"{shown_label(obj)} (group {group})" if group else shown_label(obj))
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
        key=lambda o: (shown_label(o).lower() in people, float(o.get("score") or 0.0), -int(o["id"])),
    )
    label = shown_label(best)
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
