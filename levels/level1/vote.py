"""VoteStage: the cross-model vote that turns per-member candidates into objects.

A group of boxes from at least ``min_models`` distinct members is an object; anything short of
that is a floating object, except persons, which follow ``level1.person``: a confident person
from a trusted member is promoted, one from a noisy member is dropped. ``level1.trusted`` does the
same for every other label, for ensembles with a single strong detector (the lite profile). Unlike the reference, the
object's box is the score-weighted fusion of its members (``box_fusion: anchor`` restores the
reference behaviour).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from grand_pipeline.geometry.vote import VoteGroup, cross_model_vote, fuse_boxes, group_scores
from grand_pipeline.models.roles import Detections
from grand_pipeline.schemas import OBJECT
from grand_pipeline.stage import ImageRecord, Stage
from levels.level1.nms import PERSON
from levels.objects import OBJECT_KEYS, new_object

logger = logging.getLogger(__name__)

OBJECTS, FLOATING, DROPPED = "objects", "floating_objects", None


def member_order(cfg: Any, present: list[str]) -> list[str]:
    """Anchor priority: ``vote_order``, then the rest of the ensemble, then unknown members."""
    order = list(cfg.level1.vote_order) + list(cfg.models.detectors) + sorted(present)
    return list(dict.fromkeys(order))


def sort_key(obj: dict[str, Any]) -> tuple:
    """Descending score, then box, then label: a total order, so ids never depend on input order."""
    return (-obj["score"], *obj["bbox"], obj["label"])


class VoteStage(Stage):
    """candidates -> objects and floating_objects, with sequential ids (objects first)."""

    name: ClassVar[str] = "vote"
    requires: ClassVar[dict[str, str]] = {"candidates": "member -> Detections after NMS"}
    provides: ClassVar[dict[str, pa.DataType | None]] = {
        "objects": pa.list_(OBJECT),
        "floating_objects": pa.list_(OBJECT),
    }
    #: Object keys this stage fills (all of them; later stages overwrite the empty ones).
    fills: ClassVar[tuple[str, ...]] = OBJECT_KEYS

    def process(self, records: list[ImageRecord]) -> None:
        for record in records:
            objects, floating = self.vote(record.fields["candidates"])
            for i, obj in enumerate(objects + floating):
                obj["id"] = i
            record.fields["objects"] = objects
            record.fields["floating_objects"] = floating
            logger.debug("%s: %d objects, %d floating", record.image_id, len(objects), len(floating))

    def vote(self, candidates: dict[str, Detections]) -> tuple[list[dict], list[dict]]:
        """Vote one image's candidates; returns (objects, floating objects), each sorted."""
        members = member_order(self.cfg, list(candidates))
        parts = [(m, candidates[m]) for m in members if m in candidates and len(candidates[m])]
        if not parts:
            return [], []
        boxes = np.concatenate([d.boxes for _, d in parts]).astype(np.float64)
        scores = np.concatenate([d.scores for _, d in parts]).astype(np.float64)
        labels = [label for _, d in parts for label in d.labels]
        ids = np.concatenate([np.full(len(d), members.index(m)) for m, d in parts])
        level1 = self.cfg.level1
        groups = cross_model_vote(boxes, scores, ids, list(range(len(members))), level1.vote_iou)
        fused = fuse_boxes(boxes, scores, groups, mode=level1.box_fusion)
        anchor_scores = group_scores(scores, groups)
        out: dict[str, list[dict]] = {OBJECTS: [], FLOATING: []}
        for group, box, score in zip(groups, fused, anchor_scores, strict=True):
            # Members by descending score (stable: priority order on ties) give label and labels.
            ranked = sorted(group.members.tolist(), key=lambda k: -scores[k])
            union = list(dict.fromkeys(labels[k] for k in ranked))
            names = [members[m] for m in group.models]
            target = self.destination(group, members, labels[group.anchor], float(score))
            if target is not DROPPED:
                out[target].append(new_object(box, union, labels[ranked[0]], float(score), names))
        return sorted(out[OBJECTS], key=sort_key), sorted(out[FLOATING], key=sort_key)

    def destination(
        self, group: VoteGroup, members: list[str], anchor_label: str, score: float
    ) -> str | None:
        """Where a group goes: ``objects``, ``floating_objects`` or None (dropped)."""
        rules = self.cfg.level1.person
        if group.num_models >= self.cfg.level1.min_models:
            return OBJECTS
        member = members[group.models[0]]  # the anchor's member comes first
        trusted = self.cfg.level1.trusted
        if anchor_label != PERSON:
            return OBJECTS if member in trusted and score > trusted[member] else FLOATING
        if member in rules.promote and score > rules.promote[member]:
            return OBJECTS
        if member in rules.drop_unmatched_from:
            return DROPPED
        return FLOATING
