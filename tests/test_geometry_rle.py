"""Our COCO RLE codec vs pycocotools on seeded random masks."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from grand_pipeline.geometry import rle
from grand_pipeline.geometry.rle import InvalidRLE

SIZES = [(1, 1), (7, 13), (64, 48), (33, 1)]


def blob_masks(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """Blobby masks: threshold box-smoothed noise (separable moving average)."""
    noise = rng.random((n, h + 8, w + 8))
    k = np.ones(5) / 5
    sm = np.apply_along_axis(lambda r: np.convolve(r, k, "same"), 1, noise)
    sm = np.apply_along_axis(lambda r: np.convolve(r, k, "same"), 2, sm)[:, 4 : 4 + h, 4 : 4 + w]
    return sm > rng.uniform(0.45, 0.55, (n, 1, 1))


def mask_sets(seed: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    blobs = blob_masks(rng, 3, h, w)
    bits = rng.random((3, h, w)) < rng.uniform(0.1, 0.9, (3, 1, 1))
    const = np.stack([np.zeros((h, w), bool), np.ones((h, w), bool)])
    return np.concatenate([blobs, bits, const])


def coco_encode(masks: np.ndarray) -> list[dict]:
    return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("h,w", SIZES)
def test_encode_matches_pycocotools(seed: int, h: int, w: int) -> None:
    masks = mask_sets(seed, h, w)
    ours = rle.encode(masks)
    ref = coco_encode(masks)
    assert [r["counts"] for r in ours] == [r["counts"].decode() for r in ref]
    assert all(r["size"] == [h, w] for r in ours)
    np.testing.assert_array_equal(rle.decode(ours), masks)
    # pycocotools-made RLEs (bytes counts) decode the same
    np.testing.assert_array_equal(rle.decode(ref), masks)
    for m, r in zip(masks, ours, strict=True):
        np.testing.assert_array_equal(rle.decode_one(r), m)


def test_encode_large_counts_and_2d_input() -> None:
    # Long runs exercise multi-chunk values and negative deltas.
    m = np.zeros((300, 400), bool)
    m[:, 5:390] = True
    m[10:200, 100] = False
    ours = rle.encode(m)
    assert len(ours) == 1
    assert ours[0]["counts"] == coco_encode(m[None])[0]["counts"].decode()
    np.testing.assert_array_equal(rle.decode_one(ours[0]), m)


def test_encode_uint8_input() -> None:
    m = (np.random.default_rng(0).random((2, 9, 5)) > 0.5).astype(np.uint8)
    assert [r["counts"] for r in rle.encode(m)] == [r["counts"].decode() for r in coco_encode(m)]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("h,w", SIZES)
def test_area_bbox_match_pycocotools(seed: int, h: int, w: int) -> None:
    masks = mask_sets(seed, h, w)
    ours, ref = rle.encode(masks), coco_encode(masks)
    np.testing.assert_array_equal(rle.area(ours), mask_utils.area(ref).astype(np.int64))
    np.testing.assert_array_equal(rle.area(ours), masks.sum(axis=(1, 2)))
    ref_box = mask_utils.toBbox(ref).astype(np.float64)
    ref_box[:, 2:] += ref_box[:, :2]
    np.testing.assert_array_equal(rle.to_bbox(ours), ref_box)
    np.testing.assert_array_equal(rle.masks_to_boxes(masks), ref_box)


def test_bbox_empty_and_wrapping_runs() -> None:
    m = np.zeros((2, 4, 5), bool)
    m[1, 3, 1] = m[1, 0, 2] = True  # one run wrapping from column 1 into column 2
    expected = [[0, 0, 0, 0], [1, 0, 3, 4]]
    np.testing.assert_array_equal(rle.to_bbox(rle.encode(m)), expected)
    np.testing.assert_array_equal(rle.masks_to_boxes(m), expected)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("h,w", SIZES)
def test_iou_matches_pycocotools(seed: int, h: int, w: int) -> None:
    a = mask_sets(seed, h, w)
    b = np.concatenate([a[::2], mask_sets(seed + 100, h, w)])
    ra, rb = coco_encode(a), coco_encode(b)
    ref = np.asarray(mask_utils.iou(ra, rb, [0] * len(rb)), dtype=np.float64)
    out = rle.iou(rle.encode(a), rle.encode(b))
    assert out.shape == (len(a), len(b))
    np.testing.assert_allclose(out, ref, atol=1e-12)


def test_iou_empty_and_size_mismatch() -> None:
    r = rle.encode(np.ones((2, 3, 3), bool))
    assert rle.iou([], r).shape == (0, 2)
    assert rle.iou(r, []).shape == (2, 0)
    with pytest.raises(InvalidRLE):
        rle.iou(r, rle.encode(np.ones((1, 3, 4), bool)))


def test_uncompressed_counts() -> None:
    m = np.array([[0, 1, 1], [1, 0, 1]], bool)  # Fortran order: 0 1 1 0 1 1
    r = {"size": [2, 3], "counts": [1, 2, 1, 2]}
    np.testing.assert_array_equal(rle.decode_one(r), m)
    assert rle.area([r])[0] == 4
    ref = mask_utils.frPyObjects(r, 2, 3)
    assert rle.encode(m)[0]["counts"] == ref["counts"].decode()


def test_mask_nms() -> None:
    m = np.zeros((4, 10, 10), bool)
    m[0, :5, :5] = True
    m[1, :5, :4] = True  # IoU 0.8 with mask 0
    m[2, 5:, 5:] = True
    m[3, :5, :5] = True  # identical to 0
    scores = np.array([0.5, 0.9, 0.3, 0.4])
    np.testing.assert_array_equal(rle.mask_nms(rle.encode(m), scores, 0.7), [1, 2])
    np.testing.assert_array_equal(rle.mask_nms(rle.encode(m), scores, 0.85), [1, 0, 2])
    assert rle.mask_nms([], [], 0.5).shape == (0,)


GOOD = rle.encode(np.eye(6, dtype=bool))[0]


@pytest.mark.parametrize(
    "bad",
    [
        {"size": [6, 6], "counts": [0, 1, 2]},  # wrong sum
        {"size": [6, 7], "counts": GOOD["counts"]},  # wrong sum for size
        {"size": [6, 6], "counts": GOOD["counts"][:-1]},  # dropped value -> wrong sum
        {"size": [6, 6], "counts": "0" + "\x7f"},  # char above range
        {"size": [6, 6], "counts": "0 5"},  # char below range
        {"size": [6, 6], "counts": "é"},  # non-ascii
        {"size": [6, 6], "counts": "P"},  # truncated: continuation bit set on last char
        {"size": [6, 6], "counts": "o" * 20},  # truncated and absurdly long value
        {"size": [6, 6], "counts": "o" * 19 + "0"},  # absurdly long value
        {"size": [6, 6], "counts": "@"},  # negative count (-16)
        {"size": [6, 6], "counts": [36.0]},  # float counts
        {"size": [6, 6], "counts": [40, -4]},  # negative count
        {"size": [6, 6], "counts": 36},  # not a list
        {"size": [6, 6], "counts": ""},  # empty for non-empty size
        {"size": [6], "counts": GOOD["counts"]},  # bad size
        {"size": [-6, -6], "counts": GOOD["counts"]},
        {"size": [6.0, 6.0], "counts": GOOD["counts"]},
        {"size": "66", "counts": GOOD["counts"]},
        {"counts": GOOD["counts"]},  # missing key
        "not a dict",
        None,
        [GOOD],
    ],
)
def test_invalid_rle(bad: object) -> None:
    with pytest.raises(InvalidRLE):
        rle.decode_one(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidRLE):
        rle.area([bad])  # type: ignore[list-item]


def test_invalid_containers() -> None:
    with pytest.raises(InvalidRLE):
        rle.decode(GOOD)  # type: ignore[arg-type]
    with pytest.raises(InvalidRLE):
        rle.decode("abc")  # type: ignore[arg-type]
    with pytest.raises(InvalidRLE):
        rle.decode([GOOD, rle.encode(np.ones((2, 2), bool))[0]])  # mixed sizes
    assert rle.decode([]).shape == (0, 0, 0)
    assert issubclass(InvalidRLE, ValueError)


@pytest.mark.parametrize("shape", [(0, 5), (5, 0)])
def test_zero_size_masks(shape: tuple[int, int]) -> None:
    m = np.zeros(shape, bool)
    ours = rle.encode(m)
    assert ours[0]["counts"] == coco_encode(m[None])[0]["counts"].decode()
    assert rle.decode_one(ours[0]).shape == shape
    assert rle.area(ours)[0] == 0
    np.testing.assert_array_equal(rle.to_bbox(ours), [[0, 0, 0, 0]])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("h,w", SIZES)
def test_union_matches_pycocotools_merge(seed: int, h: int, w: int) -> None:
    masks = mask_sets(seed, h, w)
    ours = rle.encode(masks)
    for group in ([0], [0, 1], [0, 1, 2], [3, 4], [2, 6], [6, 7], list(range(len(masks)))):
        merged = rle.union([ours[i] for i in group])
        ref = mask_utils.merge([coco_encode(masks)[i] for i in group], intersect=False)
        assert merged["counts"] == ref["counts"].decode()
        np.testing.assert_array_equal(rle.decode_one(merged), masks[group].any(axis=0))


def test_union_touching_runs_and_errors() -> None:
    a = np.zeros((4, 3), bool)
    b = np.zeros((4, 3), bool)
    a[:2, 0] = True
    b[2:, 0] = True  # continues a's run in column-major order: one run after the merge
    merged = rle.union(rle.encode(np.stack([a, b])))
    np.testing.assert_array_equal(rle.decode_one(merged), a | b)
    assert merged["counts"] == coco_encode((a | b)[None])[0]["counts"].decode()
    with pytest.raises(rle.InvalidRLE):
        rle.union([])
    with pytest.raises(rle.InvalidRLE):
        rle.union(rle.encode(np.zeros((1, 2, 2), bool)) + rle.encode(np.zeros((1, 3, 2), bool)))
