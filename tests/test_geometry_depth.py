"""Depth kernels: exact hand-made values and a random median check."""

from __future__ import annotations

import numpy as np
import pytest

from grand_pipeline.geometry.depth import (
    area_mean,
    box_cell_areas,
    cell_sums,
    depth_grid,
    depth_layers,
    grid_medians,
    grid_size,
    lowres_depths,
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


# ----------------------------------------------------------------------------- low-resolution maps


def test_grid_size_keeps_aspect_and_never_upsamples() -> None:
    assert grid_size(1500, 2250) == (43, 64)
    assert grid_size(2250, 1500) == (64, 43)
    assert grid_size(512, 512) == (64, 64)
    assert grid_size(40, 30) == (40, 30)  # already small: one cell per pixel
    assert grid_size(1, 5000) == (1, 64)
    with pytest.raises(ValueError):
        grid_size(0, 10)


def test_cell_sums_and_area_mean_by_hand() -> None:
    # 5 rows into 2 cells: rows [0, 2) and [2, 5); 4 columns into 2: [0, 2) and [2, 4).
    depth = np.arange(20, dtype=float).reshape(5, 4)
    np.testing.assert_array_equal(cell_sums(depth, (2, 2)), [[10, 18], [75, 87]])
    np.testing.assert_allclose(area_mean(depth, (2, 2)), [[2.5, 4.5], [12.5, 14.5]])
    masks = np.zeros((2, 5, 4), bool)
    masks[0, 1:3, 1:3] = True  # one pixel in each cell
    np.testing.assert_array_equal(cell_sums(masks, (2, 2)), [[[1, 1], [1, 1]], [[0, 0], [0, 0]]])
    # Non-finite pixels are left out; a cell with none left is NaN.
    depth[0, 0], depth[2:, 2:] = np.nan, np.inf
    out = area_mean(depth, (2, 2))
    np.testing.assert_allclose(out[0], [(1 + 4 + 5) / 3, 4.5])
    assert out[1, 0] == 12.5 and np.isnan(out[1, 1])
    with pytest.raises(ValueError):
        cell_sums(depth, (6, 2))


@pytest.mark.parametrize("seed", range(3))
def test_area_mean_matches_a_loop_over_cells(seed: int) -> None:
    rng = np.random.default_rng(seed)
    height, width = rng.integers(1, 90, size=2)
    depth = rng.random((height, width))
    h, w = grid_size(int(height), int(width), longest=int(rng.integers(1, 20)))
    rows, cols = (np.arange(h + 1) * height) // h, (np.arange(w + 1) * width) // w
    expected = [[depth[rows[i] : rows[i + 1], cols[j] : cols[j + 1]].mean() for j in range(w)] for i in range(h)]
    np.testing.assert_allclose(area_mean(depth, (h, w)), expected)


@pytest.mark.parametrize("seed", range(3))
def test_area_mean_of_a_float32_map_is_bit_identical_to_the_float64_path(seed: int) -> None:
    """The all-finite fast path (float32 input, counts from the bin sizes) changes no bit of
    ``depth_lowres``: the reference is the former code, float64 copy and counted pixels."""
    rng = np.random.default_rng(seed)
    height, width = (1500, 2250) if seed == 0 else tuple(int(v) for v in rng.integers(1, 300, size=2))
    depth = (rng.standard_normal((height, width)) * 10 ** int(rng.integers(-2, 4))).astype(np.float32)
    grid = grid_size(height, width, longest=64)
    d64 = depth.astype(np.float64)
    finite = np.isfinite(d64)
    expected = cell_sums(np.where(finite, d64, 0.0), grid) / cell_sums(finite, grid)
    np.testing.assert_array_equal(area_mean(depth, grid), expected)


def test_box_cell_areas_split_a_box_over_cells() -> None:
    # 10x10 image, 2x2 grid of 5x5 cells; the box covers x 2.5..7, y 0..5 (and spills outside).
    areas = box_cell_areas([[2.5, -3, 7, 5], [20, 20, 30, 30]], (10, 10), (2, 2))
    np.testing.assert_allclose(areas[0], [[12.5, 10.0], [0, 0]])
    np.testing.assert_array_equal(areas[1], np.zeros((2, 2)))
    assert box_cell_areas(np.zeros((0, 4)), (10, 10), (2, 2)).shape == (0, 2, 2)


def test_grid_medians_weighted_and_nan_aware() -> None:
    grid = np.array([[1.0, 2.0], [3.0, np.nan]])
    weights = np.array(
        [
            [[1, 1], [1, 0]],  # 1 2 3 -> 2
            [[1, 0], [3, 0]],  # weight 3 on the 3 -> 3
            [[1, 1], [0, 0]],  # 1 2 -> lower median 1
            [[0, 0], [0, 5]],  # only the NaN cell -> NaN
            [[0, 0], [0, 0]],  # nothing -> NaN
        ],
        dtype=float,
    )
    out = grid_medians(grid, weights)
    np.testing.assert_array_equal(out[:3], [2.0, 3.0, 1.0])
    assert np.isnan(out[3:]).all()
    assert grid_medians(grid, np.zeros((0, 2, 2))).shape == (0,)
    with pytest.raises(ValueError):
        grid_medians(grid, np.ones((1, 3, 2)))


@pytest.mark.parametrize("seed", range(3))
def test_grid_medians_equal_the_median_of_the_upsampled_map(seed: int) -> None:
    rng = np.random.default_rng(seed)
    height, width, grid = 37, 53, (7, 9)
    cells = rng.random(grid)
    rows, cols = (np.arange(grid[0] + 1) * height) // grid[0], (np.arange(grid[1] + 1) * width) // grid[1]
    # Nearest-cell upsampling: every pixel takes its cell's value.
    upsampled = cells[np.repeat(np.arange(grid[0]), np.diff(rows))][:, np.repeat(np.arange(grid[1]), np.diff(cols))]
    masks = rng.random((6, height, width)) < 0.3
    out = grid_medians(cells, cell_sums(masks, grid))
    for mask, value in zip(masks, out, strict=True):
        ordered = np.sort(upsampled[mask])
        assert value == ordered[(ordered.size - 1) // 2]  # the lower median


def test_lowres_depths_use_the_mask_then_the_box() -> None:
    # 8x8 image on a 2x2 grid of 4x4 cells: near (10) on the left, far (1) on the right.
    grid = np.array([[10.0, 1.0], [10.0, np.nan]])
    masks = np.zeros((3, 8, 8), bool)
    masks[0, :, 5:] = True  # right column of cells: 1 and NaN -> 1
    masks[1, 1:7, 1:4] = True  # left cells only -> 10
    boxes = np.array([[0, 0, 8, 8], [0, 0, 8, 8], [4, 0, 8, 4]], float)  # mask 2 empty -> its box: 1
    np.testing.assert_array_equal(lowres_depths(grid, masks, boxes), [1.0, 10.0, 1.0])
    nothing = lowres_depths(grid, np.zeros((1, 8, 8), bool), [[4, 4, 8, 8]])  # box on the NaN cell
    assert np.isnan(nothing).all()
    with pytest.raises(ValueError):
        lowres_depths(grid, masks, boxes[:2])


def test_depth_grid_reads_the_stored_struct() -> None:
    grid = depth_grid({"height": 2, "width": 3, "values": [1, 2, 3, 4, float("nan"), 6]})
    assert grid is not None and grid.dtype == np.float32 and grid.shape == (2, 3)
    np.testing.assert_array_equal(grid[0], [1, 2, 3])
    assert np.isnan(grid[1, 1])
    assert depth_grid(None) is None
    with pytest.raises(ValueError):
        depth_grid({"height": 2, "width": 2, "values": [1.0, 2.0, 3.0]})
