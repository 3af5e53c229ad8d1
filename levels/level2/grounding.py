"""GroundingStage: caption phrases linked to objects; new and promoted objects; ids renumbered.

Per image (after ``utils/prepare_level_2.py`` of the reference, without its stale-id bug B9):

1. The grounder answers every phrase with a box (or nothing). Boxes are clipped to the image;
   one with no area left (or not finite) counts as no answer.
2. A box that overlaps an object at IoU > ``level2.grounding_iou`` links the phrase to it; objects
   are tried before floating objects, and the best overlap wins, not the first one listed.
   A match with a floating object adds the phrase's root noun to its ``labels`` and the grounder
   to its ``models``: a vote from the caption that the guess was right.
3. A box that matches nothing becomes a new floating object labelled with the root noun, made
   by ``grounder:<backend>``. Later phrases can match it (two phrases for one new box vote).
   Its first attribute is the phrase when the phrase says more than the root noun. It leaves
   this stage without a mask or a depth (``segmentation``, ``segmentation_source`` and
   ``depth`` None); the next stage, ``ObjectMaskStage`` (``masks.py``), segments its box and
   reads its depth from the level-1 ``depth_lowres`` map.
4. Floating objects with at least ``level2.promote_min_labels`` distinct labels, or
   ``level2.promote_min_models`` distinct models, become objects.
5. Ids are renumbered, objects first, then floating objects, and every id in
   ``relationships.grounding`` is remapped with them.

``relationships.grounding`` has one entry per phrase, in phrase order; ``object_ids`` is empty for
a phrase the grounder could not place.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from grand_pipeline.geometry.boxes import box_iou, clip_boxes
from grand_pipeline.models.roles import Grounder, Grounding
from grand_pipeline.schemas import LEVEL2_FIELDS, OBJECT
from grand_pipeline.stage import ImageRecord, Stage
from levels.objects import (
    copy_objects,
    distinct,
    image_size,
    new_object,
    next_free_id,
    object_boxes,
    renumber,
)

logger = logging.getLogger(__name__)

RELATIONSHIPS = next(f.type for f in LEVEL2_FIELDS if f.name == "relationships")


def clipped(grounding: Grounding | None, height: int, width: int) -> Grounding | None:
    """``grounding`` with its box clipped to the image; None if nothing of it is left."""
    if grounding is None:
        return None
    box = np.asarray(grounding.box, np.float64).reshape(4)
    if not np.isfinite(box).all() or not np.isfinite(grounding.score):
        return None
    box = clip_boxes(box.reshape(1, 4), height, width)[0]
    if box[2] <= box[0] or box[3] <= box[1]:
        return None
    return Grounding(phrase=grounding.phrase, box=box, score=float(grounding.score))


def best_match(box: np.ndarray, objects: list[dict[str, Any]], iou: float) -> dict[str, Any] | None:
    """The object whose box overlaps ``box`` most, if that IoU is > ``iou`` (ties: first listed)."""
    if not objects:
        return None
    overlaps = box_iou(np.asarray(box, np.float64).reshape(1, 4), object_boxes(objects))[0]
    best = int(np.argmax(overlaps))
    return objects[best] if overlaps[best] > iou else None


def grounded_object(grounding: Grounding, phrase: dict[str, Any], source: str, new_id: int) -> dict[str, Any]:
    """A new floating object for a grounding that matched nothing (see the module docstring)."""
    root = str(phrase.get("root") or phrase["phrase"]).strip().lower()
    obj = new_object(grounding.box, [root], root, float(grounding.score), [source])
    obj["id"] = new_id
    text = str(phrase["phrase"]).strip()
    if text.lower() != root:
        obj["attributes"] = [text]
    return obj


def promote(
    objects: list[dict[str, Any]], floating: list[dict[str, Any]], min_labels: int, min_models: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Move floating objects with >= ``min_labels`` distinct labels or >= ``min_models`` distinct
    models to the end of ``objects``."""

    def voted(obj: dict[str, Any]) -> bool:
        labels, models = distinct(obj.get("labels") or []), distinct(obj.get("models") or [])
        return len(labels) >= min_labels or len(models) >= min_models

    return objects + [o for o in floating if voted(o)], [o for o in floating if not voted(o)]


def link_phrases(
    phrases: list[dict[str, Any]],
    groundings: list[Grounding | None],
    objects: list[dict[str, Any]],
    floating: list[dict[str, Any]],
    iou: float,
    source: str,
) -> list[list[int]]:
    """Steps 2-3 on ``objects``/``floating`` in place; returns each phrase's (old) object ids."""
    next_id = next_free_id(objects, floating)
    links: list[list[int]] = []
    for phrase, grounding in zip(phrases, groundings, strict=True):
        if grounding is None:
            links.append([])
            continue
        target = best_match(grounding.box, objects, iou)
        if target is None:
            target = best_match(grounding.box, floating, iou)
            if target is not None:
                root = str(phrase.get("root") or "").strip().lower()
                labels = list(target.get("labels") or [])
                if root and root not in labels:
                    target["labels"] = [*labels, root]
                models = list(target.get("models") or [])
                if source not in models:
                    target["models"] = [*models, source]
        if target is None:
            target = grounded_object(grounding, phrase, source, next_id)
            next_id += 1
            floating.append(target)
        links.append([int(target["id"])])
    return links


class GroundingStage(Stage):
    """phrases -> ``relationships``; rewrites ``objects`` and ``floating_objects``."""

    name: ClassVar[str] = "grounding"
    requires: ClassVar[dict[str, str]] = {
        "image": "decoded RGB image",
        "phrases": "caption phrases",
        "objects": "level-1 objects",
        "floating_objects": "level-1 floating objects",
    }
    provides: ClassVar[dict[str, pa.DataType | None]] = {
        "relationships": RELATIONSHIPS,
        "objects": pa.list_(OBJECT),
        "floating_objects": pa.list_(OBJECT),
    }
    models: ClassVar[tuple[str, ...]] = ("grounder",)

    def process(self, records: list[ImageRecord]) -> None:
        grounder = self.backend("grounder", Grounder)
        level2 = self.cfg.level2
        source = f"grounder:{grounder.backend}"
        for record in records:
            objects, floating = copy_objects(record)
            phrases = record.fields.get("phrases") or []
            groundings: list[Grounding | None] = []
            if phrases:
                groundings = grounder.ground(
                    record.pixels, [p["phrase"] for p in phrases], objects + floating
                )
                if len(groundings) != len(phrases):
                    raise ValueError(
                        f"grounder returned {len(groundings)} results for {len(phrases)} phrases"
                    )
                height, width = image_size(record)
                groundings = [clipped(g, height, width) for g in groundings]
            links = link_phrases(phrases, groundings, objects, floating, level2.grounding_iou, source)
            objects, floating = promote(
                objects, floating, level2.promote_min_labels, level2.promote_min_models
            )
            mapping = renumber(objects, floating)
            record.fields["relationships"] = {
                "grounding": [
                    {"phrase": str(p["phrase"]), "object_ids": [mapping[i] for i in ids]}
                    for p, ids in zip(phrases, links, strict=True)
                ]
            }
            record.fields["objects"], record.fields["floating_objects"] = objects, floating
            logger.debug(
                "%s: %d/%d phrases grounded, %d objects, %d floating",
                record.image_id, sum(bool(ids) for ids in links), len(phrases), len(objects), len(floating),
            )  # fmt: skip
