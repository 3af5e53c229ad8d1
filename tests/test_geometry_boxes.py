"""Box kernels vs torchvision.ops on seeded random inputs, plus matching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou as tv_box_iou
from torchvision.ops import nms as tv_nms

from grand_pipeline.geometry.boxes import (
    box_area,
    box_contains,
    box_iou,
    clip_boxes,
    nms,
    score_filter,
    xywh_to_xyxy,
    xyxy_to_xywh,
)
from grand_pipeline.geometry.matching import match_boxes, unmatched


def random_boxes(rng: np.random.Generator, n: int, size: float = 100.0) -> np.ndarray:
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(1, size / 2, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1)


def tv_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ref = tv_box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    return np.nan_to_num(ref, nan=0.0)  # torchvision gives 0/0 = NaN for empty unions


def test_format_roundtrip() -> None:
    xywh = np.array([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    xyxy = xywh_to_xyxy(xywh)
    np.testing.assert_array_equal(xyxy, [[1, 2, 4, 6], [0, 0, 0, 0]])
    np.testing.assert_array_equal(xyxy_to_xywh(xyxy), xywh)
    assert xywh_to_xyxy([]).shape == (0, 4)


def test_box_area_degenerate() -> None:
    b = np.array([[0, 0, 2, 3], [5, 5, 5, 9], [4, 4, 1, 1], [0, 0, 1, -1]], dtype=float)
    np.testing.assert_array_equal(box_area(b), [6, 0, 0, 0])


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n,m", [(1, 1), (7, 13), (50, 40)])
def test_box_iou_matches_torchvision(seed: int, n: int, m: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = random_boxes(rng, n), random_boxes(rng, m)
    b[: m // 2] = a[rng.integers(0, n, m // 2)] + rng.normal(0, 3, (m // 2, 4))  # force overlaps
    out = box_iou(a, b)
    assert out.shape == (n, m) and out.dtype == np.float64
    np.testing.assert_allclose(out, tv_iou(a, b), atol=1e-6)


def test_box_iou_degenerate_and_empty() -> None:
    a = np.array([[0, 0, 0, 0], [1, 1, 1, 5], [0, 0, 10, 10], [3, 3, 3, 3], [4, 4, 1, 1]], dtype=float)
    b = np.array([[0, 0, 0, 0], [0, 0, 5, 5], [1, 1, 1, 5]], dtype=float)
    out = box_iou(a, b)
    np.testing.assert_allclose(out, tv_iou(a, b), atol=1e-6)
    assert not np.isnan(out).any()
    assert out[2, 1] == pytest.approx(0.25)
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 3)
    assert box_iou(a, np.zeros((0, 4))).shape == (5, 0)
    assert box_iou([], []).shape == (0, 0)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.9])
@pytest.mark.parametrize("n", [1, 20, 200])
def test_nms_matches_torchvision(seed: int, threshold: float, n: int) -> None:
    rng = np.random.default_rng(seed)
    boxes = random_boxes(rng, n, size=60.0)
    scores = rng.random(n)
    ref = tv_nms(torch.from_numpy(boxes), torch.from_numpy(scores), threshold).numpy()
    out = nms(boxes, scores, threshold)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, ref)


def test_nms_tie_break_and_empty() -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], dtype=float)
    np.testing.assert_array_equal(nms(boxes, [0.5, 0.5, 0.5], 0.5), [0, 2])
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).shape == (0,)
    with pytest.raises(ValueError):
        nms(boxes, [0.1, 0.2], 0.5)


def test_score_filter_and_clip() -> None:
    np.testing.assert_array_equal(score_filter([0.1, 0.5, 0.49, 0.9], 0.5), [1, 3])
    clipped = clip_boxes([[-5, -1, 120, 40], [10, 10, 20, 90]], height=50, width=100)
    np.testing.assert_array_equal(clipped, [[0, 0, 100, 40], [10, 10, 20, 50]])


def test_match_boxes_hand_made() -> None:
    query = np.array([[0, 0, 10, 10], [100, 100, 110, 110], [0, 0, 10, 20]], dtype=float)
    cands = np.array([[0, 0, 10, 5], [0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]], dtype=float)
    idx, best = match_boxes(query, cands, 0.5)
    np.testing.assert_array_equal(idx, [1, -1, 1])  # tie between 1 and 2 -> 1
    np.testing.assert_allclose(best, [1.0, 0.0, 0.5])
    idx, best = match_boxes(query, cands, 0.51)
    np.testing.assert_array_equal(idx, [1, -1, -1])
    np.testing.assert_allclose(best[2], 0.5)
    idx, best = match_boxes(query, np.zeros((0, 4)), 0.5)
    np.testing.assert_array_equal(idx, [-1, -1, -1])
    np.testing.assert_array_equal(best, [0, 0, 0])


def test_unmatched_hand_made() -> None:
    query = np.array([[0, 0, 10, 10]], dtype=float)
    cands = np.array([[0, 0, 10, 5], [0, 0, 10, 10], [50, 50, 60, 60]], dtype=float)
    np.testing.assert_array_equal(unmatched(query, cands, 0.5), [False, False, True])
    np.testing.assert_array_equal(unmatched(query, cands, 0.6), [True, False, True])
    np.testing.assert_array_equal(unmatched(np.zeros((0, 4)), cands, 0.5), [True, True, True])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fraction_inside_matches_pixel_loop(seed: int) -> None:
    from grand_pipeline.geometry.matching import fraction_inside

    rng = np.random.default_rng(seed)
    masks = rng.random((5, 23, 31)) > 0.6
    masks[4] = False
    boxes = np.sort(rng.uniform(0, 31, (5, 4)), axis=1)[:, [0, 1, 2, 3]]
    expected = []
    for mask, (x1, y1, x2, y2) in zip(masks, boxes, strict=True):
        ys, xs = np.nonzero(mask)
        inside = (xs + 0.5 >= x1) & (xs + 0.5 <= x2) & (ys + 0.5 >= y1) & (ys + 0.5 <= y2)
        expected.append(inside.mean() if len(xs) else 0.0)
    np.testing.assert_allclose(fraction_inside(masks, boxes), expected)


def test_box_contains_pairs_with_a_one_pixel_tolerance() -> None:
    outer = [10.0, 10.0, 50.0, 50.0]
    assert box_contains(outer, [20, 20, 30, 30])
    assert box_contains(outer, [9.5, 10, 50.9, 50])  # within the tolerance: rounding
    assert not box_contains(outer, [8.5, 10, 30, 30])
    assert not box_contains([20, 20, 30, 30], outer)
    assert not box_contains(outer, [9.5, 10, 50, 50], tolerance=0.0)
    # Vectorised over pairs: the same answers as one call per pair.
    inner = np.array([[20, 20, 30, 30], [9.5, 10, 50.9, 50], [8.5, 10, 30, 30], [10, 10, 51.5, 50]])
    np.testing.assert_array_equal(box_contains(outer, inner), [True, True, False, False])
    assert box_contains(outer, inner[0]).shape == ()
    with pytest.raises(ValueError):
        box_contains([0, 0, 1], [0, 0, 1, 1])
