"""Level 1 keeps each mask once, on the device: the rows equal the dense computation they replace."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from grand_pipeline.config import ModelSpec, PersonRules
from grand_pipeline.geometry import boxed, rle
from grand_pipeline.models.backends.blip2_region import crop_region
from grand_pipeline.models.roles import DepthEstimator, Region, Tag
from grand_pipeline.models.vision_common import region_crops
from levels.level1 import STAGES, DepthStage, MaskStage, to_row
from levels.level1.object_masks import MASKS_FIELD, ObjectMasks
from tests.test_level1_stages import (
    AGREE,
    IMAGE,
    FakeCaptioner,
    FakeDetector,
    FakeHub,
    FakeSegmenter,
    FakeTagger,
    H,
    W,
    dets,
    make_cfg,
    obj,
    record,
)


def ellipse(box: np.ndarray) -> np.ndarray:
    x1, y1, x2, y2 = box
    yy, xx = np.mgrid[:H, :W]
    return (
        ((xx + 0.5 - (x1 + x2) / 2) / ((x2 - x1) / 2)) ** 2
        + ((yy + 0.5 - (y1 + y2) / 2) / ((y2 - y1) / 2)) ** 2
    ) < 1


class EllipseSegmenter(FakeSegmenter):
    def segment(self, image, boxes):
        self.calls.append(np.asarray(boxes))
        return np.stack([ellipse(b) for b in np.asarray(boxes)]) if len(boxes) else np.zeros((0, H, W), bool)


class RandomDepth(DepthEstimator):
    """Float32 map with many ties, so even counts and duplicates decide the medians."""

    role, backend = "depth", "random_depth"

    def __init__(self) -> None:
        super().__init__(ModelSpec("random_depth", model="random-depth"))
        rng = np.random.default_rng(7)
        self.map = np.round(rng.random((H, W)) * 50).astype(np.float32) / 7

    def depth(self, images):
        return [self.map for _ in images]


def scene() -> tuple[list[Region], dict[str, Any]]:
    """Regions: ellipses for the two AGREE objects' neighbourhood plus free ones; detections."""
    rng = np.random.default_rng(3)
    regions = []
    for box in ([10, 10, 110, 110], [300, 200, 400, 300], [450, 20, 590, 180], [20, 250, 200, 390]):
        mask = ellipse(np.asarray(box, float))
        ys, xs = np.nonzero(mask)
        tight = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
        encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        regions.append(
            Region(tight, {"size": [H, W], "counts": encoded["counts"].decode()}, float(rng.random()))
        )
    detections = {
        "a": dets("a", [([10, 10, 110, 110], 0.6, "cup"), ([300, 200, 400, 300], 0.7, "plate"),
                        ([220, 40, 330, 170], 0.8, "spoon")]),
        "b": dets("b", [([14, 14, 114, 114], 0.9, "mug"), ([222, 44, 333, 171], 0.75, "spoon")]),
    }  # fmt: skip
    return regions, detections


def run_level(depth: Any) -> tuple[list[Any], FakeCaptioner]:
    regions, detections = scene()
    captioner = FakeCaptioner()
    hub = FakeHub(
        tagger=FakeTagger([Tag("cup", 0.9)]),
        detectors__a=FakeDetector("a", [detections["a"]]),
        detectors__b=FakeDetector("b", [detections["b"]]),
        segmenter=EllipseSegmenter(),
        region_captioner=captioner,
        depth=depth,
    )
    rec = record("sa_1", regions=regions)
    for stage in STAGES:
        stage(make_cfg(person=PersonRules(promote={"a": 0.5})), hub)([rec])
    assert rec.ok, rec.error
    return [rec], captioner


def test_rows_equal_the_dense_reference() -> None:
    depth = RandomDepth()
    (rec,), _ = run_level(depth)
    row = to_row(rec)
    objects = row["objects"] + row["floating_objects"]
    sources = sorted(o["segmentation_source"] for o in objects)
    assert sources == ["sa1b", "sa1b", "segmenter:fake_segmenter"]
    for o in objects:
        seg = o["segmentation"]
        dense = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)
        if o["segmentation_source"] != "sa1b":
            # The segmenter's mask, encoded from its crop: pycocotools' bytes exactly.
            expected = mask_utils.encode(np.asfortranarray(ellipse(np.asarray(o["bbox"])).astype(np.uint8)))
            assert seg["counts"] == expected["counts"].decode()
        # The depth is numpy's median over the dense mask, rounded as before.
        assert o["depth"] == round(float(np.median(depth.map[dense].astype(np.float64))), 4)
        assert o["attributes"] == [f"{int(dense.sum())} px"]  # the captioner saw the same mask
    assert MASKS_FIELD not in row and all(MASKS_FIELD not in o for o in objects)
    assert [a["description"] for a in row["floating_attributes"]] == [
        f"{int(rle.area([r.rle])[0])} px" for r in rec.regions[2:]
    ]


def test_each_region_is_decoded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[str] = []
    real = boxed.decode

    def counting(rles, device="cpu"):
        decoded.extend(r["counts"] for r in rles)
        return real(rles, device)

    monkeypatch.setattr(boxed, "decode", counting)
    (rec,), _ = run_level(RandomDepth())
    # Two matched regions (mask stage) and two leftovers (attribute stage): four decodes in all,
    # though attributes and depth read every object's mask again.
    assert sorted(decoded) == sorted(r.rle["counts"] for r in rec.regions)
    store = rec.fields[MASKS_FIELD]
    assert isinstance(store, ObjectMasks) and store.device == torch.device("cpu")


def test_a_replaced_mask_is_decoded_not_taken_from_the_store() -> None:
    segmenter = EllipseSegmenter()
    rec = record(objects=[obj([100, 100, 200, 200])], floating_objects=[])
    MaskStage(make_cfg(), FakeHub(segmenter=segmenter))([rec])
    (target,) = rec.fields["objects"]
    left = np.zeros((H, W), bool)
    left[100:200, 100:150] = True
    target["segmentation"] = rle.encode(left)[0]  # a later stage (or a test) swaps the mask
    DepthStage(make_cfg(), FakeHub(depth=RandomDepth()))([rec])
    assert target["depth"] == round(float(np.median(RandomDepth().map[left].astype(np.float64))), 4)


def test_masks_stage_uses_the_segmenters_device_masks() -> None:
    class Boxed(EllipseSegmenter):
        def segment(self, image, boxes):
            raise AssertionError("segment_boxed should be used")

        def segment_boxed(self, image, boxes):
            return boxed.from_dense(super().segment(image, boxes))

    rec = record(objects=[obj([100, 100, 200, 200])], floating_objects=[])
    MaskStage(make_cfg(), FakeHub(segmenter=Boxed()))([rec])
    seg = rec.fields["objects"][0]["segmentation"]
    assert seg == rle.encode(ellipse(np.array([100, 100, 200, 200], float)))[0]


@pytest.mark.parametrize("pad", [0.0, 0.1, 0.5])
def test_region_crops_equal_the_per_item_numpy_crops(pad: float) -> None:
    rng = np.random.default_rng(int(pad * 10))
    corner = rng.uniform(-20, 560, (12, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(0, 200, (12, 2))], axis=1).astype(np.float32)
    boxes[0] = [5, 5, 5.5, 5.2]  # degenerate: a patch around the centre
    dense = np.stack([ellipse(b) for b in boxes.astype(float)])
    dense[1] = False  # empty mask: the crop is not greyed
    expected = [crop_region(IMAGE, b, m, pad) for b, m in zip(boxes, dense, strict=True)]
    for masks in (boxed.from_dense(dense), dense, torch.from_numpy(dense)):
        got = region_crops(IMAGE, boxes, masks, pad)
        assert all(np.array_equal(g.numpy(), e) for g, e in zip(got, expected, strict=True))
    plain = region_crops(IMAGE, boxes, None, pad)
    assert all(
        np.array_equal(g.numpy(), crop_region(IMAGE, b, None, pad)) for g, b in zip(plain, boxes, strict=True)
    )


def test_vote_inputs_unchanged_by_the_store() -> None:
    """The store is private: stages before the mask stage see no trace of it."""
    rec = record(candidates=AGREE)
    assert MASKS_FIELD not in rec.fields


def test_colour_tagger_reads_tight_box_masks_like_dense_ones() -> None:
    from grand_pipeline.models.backends.colour_attributes import ColourTagger

    class CropTagger(FakeTagger):
        def classify_crops(self, crops, top_k=1):
            return [[Tag(f"{c.shape[0]}x{c.shape[1]}", 1.0)] for c in crops]

    captioner = ColourTagger(ModelSpec("colour_tagger"), hub=FakeHub(tagger=CropTagger([])))
    regions, _ = scene()
    dense = np.stack([rle.decode_one(r.rle) for r in regions])
    dense[1] = False  # an empty mask: colour from the box crop
    boxes = np.stack([r.bbox for r in regions])
    image = np.ascontiguousarray(IMAGE[:, :, ::-1])  # colours that differ inside and outside the masks
    expected = captioner.describe_regions(image, boxes, dense)
    assert captioner.describe_regions(image, boxes, boxed.from_dense(dense)) == expected
    assert len(set(expected)) > 1
