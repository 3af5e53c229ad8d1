"""Cross-model vote: hand-made cases with exact expected groups."""

from __future__ import annotations

import numpy as np
import pytest

from grand_pipeline.geometry.vote import VoteGroup, cross_model_vote, fuse_boxes, group_scores

A = [0.0, 0.0, 10.0, 10.0]
A_NEAR = [0.0, 0.0, 10.0, 11.0]  # IoU 10/11 with A
A_HALF = [0.0, 0.0, 10.0, 5.0]  # IoU 0.5 with A
FAR = [50.0, 50.0, 60.0, 60.0]


def summary(groups: list[VoteGroup]) -> list[tuple[int, list[int], list[int]]]:
    return [(g.anchor, g.members.tolist(), g.models) for g in groups]


def check_partition(groups: list[VoteGroup], n: int) -> None:
    allm = np.concatenate([g.members for g in groups])
    assert sorted(allm.tolist()) == list(range(n))


def test_two_models_agree() -> None:
    boxes = np.array([A, A_NEAR, FAR])
    groups = cross_model_vote(boxes, [0.9, 0.8, 0.7], [0, 1, 1], model_order=[0, 1])
    assert summary(groups) == [(0, [0, 1], [0, 1]), (2, [2], [1])]
    assert groups[0].num_models == 2
    check_partition(groups, 3)


def test_same_model_duplicates_do_not_vote() -> None:
    boxes = np.array([A, A_NEAR, A])
    groups = cross_model_vote(boxes, [0.9, 0.8, 0.95], [0, 0, 0], model_order=[0])
    # visited by descending score: 2, 0, 1; none joins another
    assert summary(groups) == [(2, [2], [0]), (0, [0], [0]), (1, [1], [0])]


def test_three_models_and_threshold() -> None:
    boxes = np.array([A, A_NEAR, A_HALF, A, FAR])
    ids = [2, 1, 0, 0, 2]
    scores = [0.5, 0.6, 0.7, 0.3, 0.9]
    groups = cross_model_vote(boxes, scores, ids, model_order=[1, 0, 2], iou_threshold=0.65)
    # model 1 first: anchor 1 takes box 3 (model 0) and box 0 (model 2); A_HALF is below 0.65.
    assert summary(groups) == [(1, [1, 0, 3], [1, 0, 2]), (2, [2], [0]), (4, [4], [2])]
    check_partition(groups, 5)
    # IoU exactly at the threshold joins (>=).
    groups = cross_model_vote(
        np.array([A, A_HALF]), [0.9, 0.8], [0, 1], model_order=[0, 1], iou_threshold=0.5
    )
    assert summary(groups) == [(0, [0, 1], [0, 1])]


def test_model_order_decides_anchor() -> None:
    boxes = np.array([A, A_NEAR])
    scores = [0.2, 0.9]
    g1 = cross_model_vote(boxes, scores, [0, 1], model_order=[0, 1])
    g2 = cross_model_vote(boxes, scores, [0, 1], model_order=[1, 0])
    assert summary(g1) == [(0, [0, 1], [0, 1])]
    assert summary(g2) == [(1, [1, 0], [1, 0])]
    np.testing.assert_array_equal(group_scores(scores, g1), [0.2])
    np.testing.assert_array_equal(group_scores(scores, g2), [0.9])


def test_used_boxes_are_not_reused_and_earlier_models_excluded() -> None:
    # Box 2 (model 1) already joined anchor 0; box 1 (model 1) cannot pull box 0 back.
    boxes = np.array([A, A_NEAR, A])
    groups = cross_model_vote(boxes, [0.9, 0.8, 0.7], [0, 1, 1], model_order=[0, 1])
    assert summary(groups) == [(0, [0, 1, 2], [0, 1])]
    groups = cross_model_vote(boxes, [0.9, 0.8, 0.7], [1, 0, 1], model_order=[0, 1])
    assert summary(groups) == [(1, [1, 0, 2], [0, 1])]


def test_unlisted_models_come_last() -> None:
    boxes = np.array([A, A_NEAR, FAR])
    groups = cross_model_vote(boxes, [0.9, 0.8, 0.7], [7, 3, 5], model_order=[3])
    assert summary(groups) == [(1, [1, 0], [3, 7]), (2, [2], [5])]


def test_empty_and_shape_errors() -> None:
    assert cross_model_vote(np.zeros((0, 4)), [], [], model_order=[0]) == []
    with pytest.raises(ValueError):
        cross_model_vote(np.array([A]), [0.1, 0.2], [0], model_order=[0])
    assert fuse_boxes(np.zeros((0, 4)), [], []).shape == (0, 4)


def test_fuse_boxes_weighted_and_anchor() -> None:
    boxes = np.array([[0, 0, 10, 10], [2, 4, 12, 14], [100, 100, 110, 110]], dtype=float)
    scores = np.array([0.75, 0.25, 0.0])
    groups = [
        VoteGroup(anchor=0, members=np.array([0, 1]), models=[0, 1]),
        VoteGroup(anchor=2, members=np.array([2]), models=[1]),
        VoteGroup(anchor=2, members=np.array([2, 0]), models=[1, 0]),
    ]
    weighted = fuse_boxes(boxes, scores, groups)
    np.testing.assert_allclose(weighted[0], [0.5, 1.0, 10.5, 11.0])
    np.testing.assert_allclose(weighted[1], [100, 100, 110, 110])  # all-zero scores -> mean
    np.testing.assert_allclose(weighted[2], [0, 0, 10, 10])  # zero weight on the anchor
    zero = fuse_boxes(boxes, np.zeros(3), groups[:1])
    np.testing.assert_allclose(zero[0], [1, 2, 11, 12])
    anchor = fuse_boxes(boxes, scores, groups, mode="anchor")
    np.testing.assert_array_equal(anchor, boxes[[0, 2, 2]])
    with pytest.raises(ValueError):
        fuse_boxes(boxes, scores, groups, mode="median")  # type: ignore[arg-type]
    np.testing.assert_array_equal(group_scores(scores, groups), [0.75, 0.0, 0.0])
