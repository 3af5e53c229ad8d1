"""Tight-box masks vs pycocotools (RLE bytes), numpy (medians) and the dense kernels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from grand_pipeline.geometry import boxed, rle
from grand_pipeline.geometry.depth import median_in_masks
from grand_pipeline.geometry.matching import fraction_inside

SIZES = [(1, 1), (7, 13), (64, 48), (33, 1), (1, 40), (150, 225)]


def coco_counts(masks: np.ndarray) -> list[str]:
    ref = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [r["counts"].decode() for r in ref]


def random_masks(seed: int, h: int, w: int) -> np.ndarray:
    """Edge cases first (empty, full, one pixel in each corner, full columns and rows), then random
    blobs, noise and boxes touching the borders."""
    rng = np.random.default_rng(seed)
    special = np.zeros((8, h, w), bool)
    special[1] = True
    special[2, 0, 0] = special[3, h - 1, w - 1] = special[4, rng.integers(h), rng.integers(w)] = True
    special[5, :, rng.integers(w) :] = True  # full-height columns: runs cross column ends
    special[6, rng.integers(h) :, :] = True
    special[7, :, 0] = special[7, 0, :] = True
    noise = rng.random((4, h, w)) < rng.uniform(0.05, 0.95, (4, 1, 1))
    yy, xx = np.mgrid[:h, :w]
    blobs = np.stack(
        [
            ((yy - rng.uniform(0, h)) / rng.uniform(1, h)) ** 2
            + ((xx - rng.uniform(0, w)) / rng.uniform(1, w)) ** 2
            < 1
            for _ in range(4)
        ]
    )
    return np.concatenate([special, noise, blobs])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("h,w", SIZES)
def test_encode_and_decode_match_pycocotools(seed: int, h: int, w: int) -> None:
    masks = random_masks(seed, h, w)
    expected = coco_counts(masks)
    assert [r["counts"] for r in rle.encode(masks)] == expected  # the dense encoder
    bm = boxed.from_dense(masks)
    assert [r["counts"] for r in boxed.encode(bm)] == expected
    np.testing.assert_array_equal(np.asarray(bm), masks)
    np.testing.assert_array_equal(bm.areas(), masks.sum(axis=(1, 2)))
    # Decoding pycocotools' strings gives the same crops and tight boxes as pycocotools' toBbox.
    decoded = boxed.decode([{"size": [h, w], "counts": c} for c in expected])
    np.testing.assert_array_equal(np.asarray(decoded), masks)
    np.testing.assert_array_equal(decoded.boxes, bm.boxes)
    np.testing.assert_array_equal(decoded.boxes, rle.to_bbox(rle.encode(masks)).astype(np.int64))
    assert [r["counts"] for r in boxed.encode(decoded)] == expected
    for i in (0, 1, len(masks) - 1):
        np.testing.assert_array_equal(decoded[i].numpy(), masks[i])


def test_encode_zero_sizes_and_bytes_counts() -> None:
    for shape in [(0, 5), (5, 0)]:
        m = np.zeros((1, *shape), bool)
        assert [r["counts"] for r in boxed.encode(boxed.from_dense(m))] == coco_counts(m)
    m = random_masks(0, 9, 11)
    ref = mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0).astype(np.uint8)))
    np.testing.assert_array_equal(np.asarray(boxed.decode(ref)), m)  # bytes counts
    assert len(boxed.decode([])) == 0 and boxed.encode(boxed.decode([])) == []


def test_strings_from_counts_restarts_delta_coding_per_mask() -> None:
    masks = random_masks(5, 30, 20)
    counts = [rle.parse(r)[2] for r in rle.encode(masks)]
    assert rle.strings_from_counts(counts) == coco_counts(masks)
    assert rle.strings_from_counts([np.array([600])]) == coco_counts(np.zeros((1, 30, 20), bool))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("h,w,n", [(1, 1, 2), (9, 7, 5), (64, 80, 12), (31, 17, 30)])
def test_median_depth_equals_numpy(seed: int, h: int, w: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    depth = rng.random((h, w)).astype(np.float32)
    depth[rng.random((h, w)) < 0.2] = 0.5  # ties
    masks = rng.random((n, h, w)) < rng.uniform(0.05, 0.9, (n, 1, 1))
    masks[0] = False
    out = boxed.median_depth(depth, boxed.from_dense(masks))
    expected = [np.median(depth[m].astype(np.float64)) if m.any() else np.nan for m in masks]
    np.testing.assert_array_equal(out, expected)  # exact, including NaN for the empty mask
    np.testing.assert_array_equal(out, median_in_masks(depth, masks))
    # A tensor map works too, and a NaN inside a mask gives NaN as np.median does.
    depth[0, 0] = np.nan
    masks[1, 0, 0] = True
    out = boxed.median_depth(torch.from_numpy(depth), boxed.from_dense(masks))
    np.testing.assert_array_equal(out, median_in_masks(depth, masks))


def test_median_depth_even_count_mean_and_errors() -> None:
    depth = np.array([[1.0, 2.0, 4.0, 8.0]], np.float32)
    masks = np.array(
        [[[True, True, True, True]], [[False, True, True, False]], [[False, False, False, True]]]
    )
    np.testing.assert_array_equal(boxed.median_depth(depth, boxed.from_dense(masks)), [3.0, 3.0, 8.0])
    with pytest.raises(ValueError):
        boxed.median_depth(depth[:, :3], boxed.from_dense(masks))


def test_fraction_inside_windows_and_boxes() -> None:
    masks = random_masks(1, 40, 50)
    rng = np.random.default_rng(2)
    corner = rng.uniform(-5, 45, (len(masks), 2))
    boxes = np.concatenate([corner, corner + rng.uniform(0, 30, (len(masks), 2))], axis=1)
    bm = boxed.from_dense(masks)
    np.testing.assert_array_equal(boxed.fraction_inside(bm, boxes), fraction_inside(masks, boxes))
    for i in range(len(masks)):
        np.testing.assert_array_equal(bm.window(i, (3, 5, 30, 38)).numpy(), masks[i, 5:38, 3:30])
    taken = bm.take([3, 0])
    np.testing.assert_array_equal(np.asarray(taken), masks[[3, 0]])
    both = boxed.BoxedMasks.concat([taken, bm.take([1])], (40, 50), torch.device("cpu"))
    np.testing.assert_array_equal(np.asarray(both), masks[[3, 0, 1]])
    assert both.shape == (3, 40, 50) and len(both) == 3


def test_from_boxes_covers_at_least_one_pixel() -> None:
    bm = boxed.from_boxes([[1.5, 2.2, 3.1, 4.0], [-3, -3, 0.2, 0.1], [10, 10, 10, 10]], (8, 9))
    dense = np.asarray(bm)
    assert dense[0].sum() == 3 * 2 and dense[0, 2:4, 1:4].all()
    assert dense[1].sum() == 1 and dense[1, 0, 0]
    assert dense[2].sum() == 1 and dense[2, 7, 8]  # clipped into the image


def test_the_torch_kernels_agree_with_the_numpy_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """What runs on a GPU, run on the CPU: every kernel through its torch branch."""
    from grand_pipeline.models.vision_common import region_crops

    h, w = 64, 48
    masks = random_masks(3, h, w)
    rng = np.random.default_rng(4)
    depth = np.round(rng.random((h, w)) * 9).astype(np.float32)
    depth[1, 1] = np.nan  # masks over it get NaN, as np.median gives
    boxes = np.concatenate(
        [rng.uniform(-5, 40, (len(masks), 2)), rng.uniform(10, 70, (len(masks), 2))], axis=1
    )
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    expected_rles = coco_counts(masks)
    numpy_side = boxed.from_dense(masks)
    expected_crops = [c.numpy() for c in region_crops(image, boxes, numpy_side, 0.1)]
    monkeypatch.setattr(boxed, "host_kernels", lambda device: False)
    for bm in (
        boxed.from_dense(masks),
        boxed.from_dense(torch.from_numpy(masks)),
        boxed.decode(rle.encode(masks)),
    ):
        assert [r["counts"] for r in boxed.encode(bm)] == expected_rles
        np.testing.assert_array_equal(np.asarray(bm), masks)
        np.testing.assert_array_equal(bm.areas(), masks.sum(axis=(1, 2)))
        np.testing.assert_array_equal(boxed.median_depth(depth, bm), median_in_masks(depth, masks))
        np.testing.assert_array_equal(boxed.fraction_inside(bm, boxes), fraction_inside(masks, boxes))
        np.testing.assert_array_equal(bm.window(5, (3, 4, 30, 40)).numpy(), masks[5, 4:40, 3:30])
        got = region_crops(image, boxes, bm, 0.1)
        assert all(np.array_equal(g.numpy(), e) for g, e in zip(got, expected_crops, strict=True))
