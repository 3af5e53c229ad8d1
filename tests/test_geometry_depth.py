"""Depth kernels: exact hand-made values and a random median check."""

from __future__ import annotations

import numpy as np
import pytest

from grand_pipeline.geometry.depth import (
    depth_layers,
    median_in_masks,
    normalise_depth,
    proximity_groups,
)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("h,w,n", [(1, 1, 2), (9, 7, 5), (64, 80, 12)])
def test_median_in_masks_random(seed: int, h: int, w: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    depth = rng.random((h, w)).astype(np.float32)
    masks = rng.random((n, h, w)) < rng.uniform(0.05, 0.9, (n, 1, 1))
    masks[0] = False
    out = median_in_masks(depth, masks)
    assert out.shape == (n,) and out.dtype == np.float64
    assert np.isnan(out[0])
    for i in range(1, n):
        if masks[i].any():
            assert out[i] == pytest.approx(float(np.median(depth[masks[i]].astype(np.float64))))
        else:
            assert np.isnan(out[i])


def test_median_in_masks_exact_and_errors() -> None:
    depth = np.arange(12, dtype=float).reshape(3, 4)
    masks = np.zeros((2, 3, 4), bool)
    masks[0, 0, :3] = True  # 0 1 2
    masks[1, :, 3] = True  # 3 7 11
    masks[1, 0, 0] = True  # 0 3 7 11 -> 5
    np.testing.assert_array_equal(median_in_masks(depth, masks), [1.0, 5.0])
    assert median_in_masks(depth, np.zeros((0, 3, 4), bool)).shape == (0,)
    with pytest.raises(ValueError):
        median_in_masks(depth, np.zeros((1, 4, 3), bool))


def test_normalise_depth() -> None:
    out = normalise_depth([2.0, 4.0, np.nan, 3.0])
    np.testing.assert_allclose(out, [1.0, 0.0, np.nan, 0.5])
    np.testing.assert_allclose(normalise_depth([3.0, 3.0, np.nan]), [0.5, 0.5, np.nan])
    assert np.isnan(normalise_depth([np.nan])).all()
    assert normalise_depth([]).shape == (0,)


def test_depth_layers() -> None:
    values = [0.0, 0.0999, 0.1, 0.5999, 0.6, 0.8499, 0.85, 1.0, np.nan]
    assert depth_layers(values) == [
        "immediate foreground",
        "immediate foreground",
        "foreground",
        "foreground",
        "midground",
        "midground",
        "background",
        "background",
        "unknown",
    ]
    assert depth_layers([0.3], thresholds=(0.2, 0.25, 0.3)) == ["background"]
    with pytest.raises(ValueError):
        depth_layers([0.3], thresholds=(0.5, 0.2, 0.9))


def test_proximity_groups() -> None:
    # 100x100 image: diagonal ~141.4, radius_frac 0.2 -> ~28.28 px.
    boxes = np.array(
        [
            [0, 0, 10, 10],  # centre (5, 5)       fg    -> seed 0
            [20, 20, 30, 30],  # centre (25, 25)   fg    dist 28.28 -> joins 0
            [40, 40, 50, 50],  # centre (45, 45)   fg    dist 56.6 from seed 0 -> new (no chaining)
            [0, 0, 10, 10],  # centre (5, 5)       bg    other layer -> new
            [2, 2, 12, 12],  # centre (7, 7)       bg    joins 3
            [60, 60, 70, 70],  # centre (65, 65)   fg    dist 28.28 from seed 2 -> joins 2
            [0, 0, 10, 10],  # centre (5, 5)       unknown -> own group
        ],
        dtype=float,
    )
    layers = ["foreground", "foreground", "foreground", "background", "background", "foreground", "unknown"]
    out = proximity_groups(boxes, layers, (100, 100), radius_frac=0.2 + 1e-9)
    np.testing.assert_array_equal(out, [0, 0, 1, 2, 2, 1, 3])
    out = proximity_groups(boxes, layers, (100, 100), radius_frac=0.1)
    np.testing.assert_array_equal(out, [0, 1, 2, 3, 3, 4, 5])
    assert proximity_groups(np.zeros((0, 4)), [], (10, 10)).shape == (0,)
    with pytest.raises(ValueError):
        proximity_groups(boxes, layers[:-1], (100, 100))
