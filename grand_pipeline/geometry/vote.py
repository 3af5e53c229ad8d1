"""GranD cross-model box vote.

Several open-vocabulary detectors label the same image; an object is trusted
more when boxes from *different* models agree on it. The vote groups boxes
greedily, giving priority to models earlier in ``model_order``, and every box
ends up in exactly one group (unconfirmed boxes form singleton groups, which
callers may drop or keep depending on how many models they require).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

from .boxes import as_boxes, box_iou

__all__ = ["VoteGroup", "cross_model_vote", "fuse_boxes", "group_scores"]


@dataclass
class VoteGroup:
    """One object hypothesis produced by :func:`cross_model_vote`.

    Attributes:
      anchor: index of the box that started the group.
      members: (K,) int64 indices of all boxes in the group, anchor first, then
        the joined boxes in ascending index order.
      models: distinct model ids present in the group, in voting priority order
        (the anchor's model first).
    """

    anchor: int
    members: np.ndarray
    models: list[int] = field(default_factory=list)

    @property
    def num_models(self) -> int:
        return len(self.models)


def _model_sequence(model_ids: np.ndarray, model_order: list[int]) -> list[int]:
    """model_order, then models absent from it (ascending id) so no box is lost."""
    ordered = list(dict.fromkeys(int(m) for m in model_order))
    extra = sorted(set(int(m) for m in np.unique(model_ids)) - set(ordered))
    return ordered + extra


def cross_model_vote(
    boxes: ArrayLike,
    scores: ArrayLike,
    model_ids: ArrayLike,
    model_order: list[int],
    iou_threshold: float = 0.65,
) -> list[VoteGroup]:
    """Group boxes that different models agree on.

    Greedy procedure: models are visited in ``model_order``; within a model its
    boxes are visited by descending score (ties: lower index first). Each box
    not yet used becomes an anchor, and every not-yet-used box of every *later*
    model joins the anchor's group when IoU(anchor, box) >= ``iou_threshold``
    (several boxes of the same later model may join). Joined boxes are marked
    used. Boxes of one model therefore never vote with each other. An IoU
    threshold t is the same as a box-Dice threshold 2t / (1 + t).

    Boxes whose model id is not in ``model_order`` are visited after all listed
    models, by ascending model id.

    Arguments:
      boxes: (N, 4) float xyxy.
      scores: (N,) float.
      model_ids: (N,) int model id of each box.
      model_order: model ids from highest to lowest priority.
      iou_threshold: inclusive IoU needed to join a group.

    Returns:
      groups in creation order; together their members cover every box exactly once.
    """
    b = as_boxes(boxes)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    mids = np.asarray(model_ids).reshape(-1).astype(np.int64)
    n = b.shape[0]
    if s.shape[0] != n or mids.shape[0] != n:
        raise ValueError(f"got {n} boxes, {s.shape[0]} scores and {mids.shape[0]} model ids")
    if n == 0:
        return []
    sequence = _model_sequence(mids, model_order)
    rank = {m: r for r, m in enumerate(sequence)}
    box_rank = np.asarray([rank[int(m)] for m in mids], dtype=np.int64)
    iou = box_iou(b, b)  # computed once; each anchor reads one row
    used = np.zeros(n, dtype=bool)
    groups: list[VoteGroup] = []
    for r, model in enumerate(sequence):
        own = np.flatnonzero(box_rank == r)
        for anchor in own[np.argsort(-s[own], kind="stable")]:
            if used[anchor]:
                continue
            joins = (~used) & (box_rank > r) & (iou[anchor] >= iou_threshold)
            used[anchor] = True
            used |= joins
            joined = np.flatnonzero(joins)
            present = set(int(m) for m in mids[joined])
            models = [model] + [m for m in sequence[r + 1 :] if m in present]
            members = np.concatenate(([anchor], joined)).astype(np.int64)
            groups.append(VoteGroup(anchor=int(anchor), members=members, models=models))
    return groups


def fuse_boxes(
    boxes: ArrayLike,
    scores: ArrayLike,
    groups: list[VoteGroup],
    mode: Literal["weighted", "anchor"] = "weighted",
) -> np.ndarray:
    """One box per group.

    Arguments:
      boxes: (N, 4) float xyxy, the array the groups index into.
      scores: (N,) float, assumed non-negative.
      groups: output of :func:`cross_model_vote`.
      mode: "weighted" = score-weighted mean of member boxes (plain mean when all
        member scores are 0); "anchor" = the anchor's box unchanged.

    Returns:
      (G, 4) float64 xyxy.
    """
    b = as_boxes(boxes)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    out = np.zeros((len(groups), 4), dtype=np.float64)
    if mode == "anchor":
        for g, grp in enumerate(groups):
            out[g] = b[grp.anchor]
        return out
    if mode != "weighted":
        raise ValueError(f"mode must be 'weighted' or 'anchor', got {mode!r}")
    for g, grp in enumerate(groups):
        w = s[grp.members]
        total = w.sum()
        if total > 0:
            out[g] = (w[:, None] * b[grp.members]).sum(axis=0) / total
        else:
            out[g] = b[grp.members].mean(axis=0)
    return out


def group_scores(scores: ArrayLike, groups: list[VoteGroup]) -> np.ndarray:
    """Score of each group: the anchor's score.

    The anchor is the highest-scoring unused box of the highest-priority model in
    the group, so its score is the one the priority model vouches for; averaging
    would mix calibrations of different detectors.

    Returns:
      (G,) float64.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    return np.asarray([s[g.anchor] for g in groups], dtype=np.float64).reshape(-1)
