"""Bounded memory and work per image in Level 1 (issue 12): segmenter masks one at a time,
the floating-attribute region cap, and degenerate (1-px) image sizes."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data as skdata

from grand_pipeline.config import ModelSpec
from grand_pipeline.geometry import boxed, rle
from grand_pipeline.models.backends.ground_plane_depth import _GREY as GREY
from grand_pipeline.models.backends.ground_plane_depth import GroundPlaneDepth, contrast_cue
from grand_pipeline.models.backends.ground_plane_depth import _box_mean as box_mean
from grand_pipeline.models.backends.litemedsam import LiteMedSAM
from grand_pipeline.models.backends.sam import SamSegmenter
from grand_pipeline.models.mask_logits import STABILITY_OFFSET
from grand_pipeline.models.roles import Region
from levels.level1 import AttributeStage
from levels.level1.attributes import largest_regions
from tests.test_level1_stages import FakeCaptioner, FakeHub, make_cfg, obj, record

COFFEE = skdata.coffee()  # (400, 600, 3)
BOXES = np.array(
    [[147, 10, 426, 398], [0, 0, 600, 400], [20, 30, 90, 120], [300, 200, 310, 205], [550, 350, 640, 420]]
    + [[10 * k, 5 * k, 10 * k + 120, 5 * k + 90] for k in range(14)],
    np.float32,
)  # 19 boxes: more than one decoder batch of 16, one past the border


@pytest.fixture(scope="module")
def lite() -> LiteMedSAM:
    return LiteMedSAM(ModelSpec("litemedsam", "package:", batch_size=16))


def batched_reference(
    seg: LiteMedSAM, image: np.ndarray, boxes: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-issue-12 path: each decoder batch upsampled to (c, H, W) in one call."""
    height, width = image.shape[:2]
    cleaned = seg._clean_boxes(boxes, height, width)
    x, scale, new_h, new_w = seg._preprocess(image)
    logits, ious = [], []
    with torch.inference_mode():
        embedding = seg.net.image_encoder(x)
        dense_pe = seg.net.prompt_encoder.get_dense_pe()
        for lo in range(0, len(cleaned), seg.batch_size):
            chunk = torch.from_numpy(cleaned[lo : lo + seg.batch_size] * scale)
            sparse, dense = seg.net.prompt_encoder(points=None, boxes=chunk[:, None, :], masks=None)
            low_res, iou = seg.net.mask_decoder(
                image_embeddings=embedding, image_pe=dense_pe, sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense, multimask_output=False,
            )  # fmt: skip
            small = low_res[..., :new_h, :new_w].float()
            logits.append(
                F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)[:, 0]
            )
            ious.append(iou[:, 0].float())
    return torch.cat(logits), torch.cat(ious)


@pytest.mark.slow  # three LiteMedSAM encoder passes: ~10-50 s on two shared cores
def test_litemedsam_per_mask_path_is_bit_identical_to_the_batched_one(lite) -> None:
    logits, iou = batched_reference(lite, COFFEE, BOXES)
    old_masks = logits > lite.logit_threshold
    assert 0 < int(old_masks.sum()) < old_masks.numel()  # real masks, not all empty or full
    inter = (logits > STABILITY_OFFSET).flatten(1).sum(1).float()
    union = (logits > -STABILITY_OFFSET).flatten(1).sum(1).float()
    old_stability = torch.where(union > 0, inter / union.clamp(min=1), 0.0).numpy()

    masks, iou_pred, stability = lite.segment_with_scores(COFFEE, BOXES)
    assert np.array_equal(masks, old_masks.numpy())
    assert np.array_equal(iou_pred, iou.numpy()) and np.array_equal(stability, old_stability)
    new_rles = boxed.encode(lite.segment_boxed(COFFEE, BOXES))
    assert new_rles == boxed.encode(boxed.from_dense(old_masks)) == rle.encode(old_masks.numpy())


def test_segmenters_never_hold_a_stack_of_full_resolution_masks(lite, monkeypatch) -> None:
    """At 1500x1500 with 16 boxes, every full-size tensor made is one mask, never (16, H, W)."""
    image = np.random.default_rng(0).integers(0, 255, (1500, 1500, 3), dtype=np.uint8)
    boxes = np.array([[90 * k, 80 * k, 90 * k + 300, 80 * k + 260] for k in range(16)], np.float32)
    seen: list[tuple[int, ...]] = []
    interpolate, from_dense = F.interpolate, boxed.from_dense

    def record_interpolate(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = interpolate(x, *args, **kwargs)
        seen.append(tuple(out.shape))
        return out

    def record_from_dense(masks: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(tuple(masks.shape))
        return from_dense(masks, *args, **kwargs)

    monkeypatch.setattr(F, "interpolate", record_interpolate)
    monkeypatch.setattr(boxed, "from_dense", record_from_dense)
    sam = SamSegmenter(ModelSpec("sam", "tiny:0", batch_size=16))
    for seg in (lite, sam):
        seen.clear()
        out = seg.segment_boxed(image, boxes)
        assert out.shape == (16, 1500, 1500)
        full = [s for s in seen if s[-2:] == (1500, 1500)]
        assert len(full) >= 32, seen  # one upsample and one boxing per mask
        assert all(int(np.prod(s[:-2])) == 1 for s in full), full


def test_rle_strings_are_made_in_bounded_passes(monkeypatch) -> None:
    """Masks with many runs are encoded a few at a time, with the same strings as pycocotools."""
    import pycocotools.mask as coco

    rng = np.random.default_rng(0)
    masks = rng.random((6, 120, 90)) < 0.5  # ~5,400 runs each
    expected = [r["counts"].decode() for r in coco.encode(np.asfortranarray(masks.transpose(1, 2, 0)))]
    passes: list[int] = []
    one_pass = rle._strings_pass

    def counting(counts: Any) -> list[str]:
        passes.append(len(counts))
        return one_pass(counts)

    monkeypatch.setattr(rle, "_strings_pass", counting)
    monkeypatch.setattr(rle, "RUNS_PER_PASS", 10_000)
    assert [r["counts"] for r in rle.encode(masks)] == expected
    assert sum(passes) == 6 and max(passes) <= 2 and len(passes) >= 3


def _square_region(x: int, y: int, side: int, size: tuple[int, int]) -> Region:
    mask = np.zeros(size, bool)
    mask[y : y + side, x : x + side] = True
    return Region(bbox=np.asarray([x, y, x + side, y + side], np.float32), rle=rle.encode(mask)[0])


def test_largest_regions_keeps_the_biggest_in_their_given_order() -> None:
    size = (400, 600)
    regions = [_square_region(5 * k, 5 * k, side, size) for k, side in enumerate([40, 80, 60, 80, 50])]
    picked = largest_regions(regions, 3)
    assert picked == [regions[1], regions[2], regions[3]]  # ties (two 80s) both fit; file order kept
    assert largest_regions(regions, 10) is regions
    assert largest_regions(regions, 0) == []


def test_two_thousand_small_regions_are_capped_and_fast(caplog) -> None:
    h, w = COFFEE.shape[:2]
    rng = np.random.default_rng(0)
    # 2,000 small square masks, all above region_min_area (1% of 400x600 = 2,400 px: sides 50-70).
    sides = rng.integers(50, 71, 2000)
    corners = rng.integers(0, [w - 70, h - 70], (2000, 2))
    regions = [
        _square_region(int(x), int(y), int(s), (h, w)) for (x, y), s in zip(corners, sides, strict=True)
    ]
    captioner = FakeCaptioner()
    stage = AttributeStage(make_cfg(max_regions=32), FakeHub(region_captioner=captioner))
    objects = [obj([0, 0, 20, 20])]
    rec = record(regions=regions, objects=objects, floating_objects=[])
    start = time.perf_counter()
    with caplog.at_level("INFO", logger="levels.level1.attributes"):
        stage.process([rec])
    assert time.perf_counter() - start < 10.0
    floating = rec.fields["floating_attributes"]
    assert len(floating) == 32 and captioner.calls == 1
    # The 32 largest boxes (the captioner names each by its mask's pixel count), in file order.
    area = sides.astype(np.int64) ** 2
    expected = np.sort(np.argsort(-area, kind="stable")[:32])
    assert [f["description"] for f in floating] == [f"{area[i]} px" for i in expected]
    assert "1968 dropped" in caplog.text


@pytest.mark.parametrize("shape", [(1, 1), (10000, 1), (1, 10000), (1, 300), (300, 1), (2, 600)])
def test_ground_plane_depth_on_one_pixel_wide_images(shape) -> None:
    image = np.random.default_rng(0).integers(0, 255, (*shape, 3), dtype=np.uint8)
    depth = GroundPlaneDepth(ModelSpec("ground_plane")).depth([image])[0]
    assert depth.shape == shape and depth.dtype == np.float32
    assert np.isfinite(depth).all() and 0.0 <= depth.min() <= depth.max() <= 1.0
    assert contrast_cue(image).shape == shape


def test_contrast_cue_unchanged_on_ordinary_images() -> None:
    """The 1-px guard must not change a 2-D image's cue: the same as the plain ``np.gradient``."""
    small = np.asarray(Image.fromarray(COFFEE).resize((256, 171), Image.Resampling.BILINEAR), np.float32)
    gy, gx = np.gradient(small @ GREY / 255.0)
    cue = box_mean(np.hypot(gx, gy).astype(np.float32), 5)
    full = Image.fromarray(cue / cue.max()).resize(COFFEE.shape[1::-1], Image.Resampling.BILINEAR)
    assert np.array_equal(contrast_cue(COFFEE), np.clip(np.asarray(full, np.float32), 0.0, 1.0))


@pytest.mark.slow  # loads every tiny-lite Level-1 model
def test_level1_tiny_lite_annotates_one_pixel_images(tiny_cfg) -> None:
    """Every Level-1 stage with the tiny-lite models on 1x1 and 1x300 images: rows come out ok.

    The region has a 1-px mask, so the mask, attribute and depth stages see a mask too.
    """
    from grand_pipeline.models.hub import ModelHub
    from grand_pipeline.stage import ImageRecord
    from levels.level1 import STAGES, to_row

    hub = ModelHub(tiny_cfg.models)
    stages = [stage(tiny_cfg, hub) for stage in STAGES]
    rng = np.random.default_rng(0)
    records = []
    for h, w in [(1, 1), (1, 300), (300, 1)]:
        image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        records.append(
            ImageRecord(
                image_id=f"d{h}x{w}", shard_id="sa_000000", width=w, height=h, image=image,
                regions=[_square_region(0, 0, 1, (h, w))],
            )
        )  # fmt: skip
    for stage in stages:
        stage(records)
    for rec in records:
        assert rec.ok, (rec.image_id, rec.error_stage, rec.error)
        row = to_row(rec)
        for item in row["objects"] + row["floating_objects"]:
            assert item["segmentation"]["size"] == [rec.height, rec.width]
