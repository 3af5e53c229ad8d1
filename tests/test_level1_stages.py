"""Level-1 stages, each driven directly (no Ray) with scripted fake backends on a real photo."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from skimage import data as skdata

from grand_pipeline.config import GrandConfig, Level1Config, ModelsConfig, ModelSpec, PersonRules
from grand_pipeline.geometry import rle
from grand_pipeline.models.roles import (
    Backend,
    DepthEstimator,
    Detections,
    Detector,
    Region,
    RegionCaptioner,
    Segmenter,
    Tag,
    Tagger,
)
from grand_pipeline.schemas import OBJECT, level_schema
from grand_pipeline.stage import ImageRecord
from levels.base import LEVELS
from levels.level1 import (
    LEVEL1,
    STAGES,
    AttributeStage,
    DepthStage,
    DetectStage,
    MaskStage,
    NmsStage,
    TagStage,
    VoteStage,
    to_row,
)
from levels.objects import OBJECT_KEYS, new_object

IMAGE = skdata.coffee()  # (400, 600, 3) uint8 RGB
H, W = IMAGE.shape[:2]

# ----------------------------------------------------------------------------- fakes


class FakeTagger(Tagger):
    role, backend = "tagger", "fake_tagger"

    def __init__(self, tags: list[Tag]) -> None:
        super().__init__(ModelSpec("fake_tagger", model="fake-tagger"))
        self.tags = tags

    def tag(self, images: list[np.ndarray]) -> list[list[Tag]]:
        return [list(self.tags) for _ in images]


class FakeDetector(Detector):
    """Returns the scripted Detections of image i; remembers the contexts it was given."""

    role, backend = "detector", "fake_detector"

    def __init__(self, name: str, per_image: list[Detections]) -> None:
        super().__init__(ModelSpec("fake_detector", model=f"fake-{name}"))
        self.per_image = per_image
        self.contexts: list[list[dict[str, Any]]] = []

    def detect(self, images, context=None):
        self.contexts.append(context)
        return [self.per_image[i] for i in range(len(images))]


class FakeSegmenter(Segmenter):
    """Masks = the box interiors; records every call's boxes."""

    role, backend = "segmenter", "fake_segmenter"

    def __init__(self) -> None:
        super().__init__(ModelSpec("fake_segmenter"))
        self.calls: list[np.ndarray] = []

    def segment(self, image, boxes):
        self.calls.append(np.asarray(boxes))
        masks = np.zeros((len(boxes), *image.shape[:2]), bool)
        for k, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, int)):
            masks[k, y1:y2, x1:x2] = True
        return masks


class FakeCaptioner(RegionCaptioner):
    """Describes each region by its mask's pixel count, so tests can see which mask it got."""

    role, backend = "region_captioner", "fake_captioner"

    def __init__(self) -> None:
        super().__init__(ModelSpec("fake_captioner"))
        self.calls = 0

    def describe_regions(self, image, boxes, masks):
        self.calls += 1
        assert masks.shape == (len(boxes), *image.shape[:2])
        return [f"{int(m.sum())} px" for m in masks]


class FakeDepth(DepthEstimator):
    """Inverse depth = column index: a value that is easy to predict for any mask."""

    role, backend, heuristic = "depth", "fake_depth", True

    def __init__(self) -> None:
        super().__init__(ModelSpec("fake_depth", model="fake-depth"))

    def depth(self, images):
        return [np.tile(np.arange(im.shape[1], dtype=np.float32), (im.shape[0], 1)) for im in images]


class FakeHub:
    def __init__(self, **backends: Any) -> None:
        self.backends = {key.replace("__", "."): value for key, value in backends.items()}

    def get(self, key: str) -> Any:
        return self.backends[key]


# ----------------------------------------------------------------------------- helpers


def make_cfg(members: tuple[str, ...] = ("a", "b"), **level1: Any) -> GrandConfig:
    spec = ModelSpec("fake")
    models = ModelsConfig(
        tagger=spec,
        detectors={m: spec for m in members},
        segmenter=spec,
        depth=spec,
        region_captioner=spec,
    )
    return GrandConfig(profile="tiny-lite", models=models, level1=Level1Config(**level1))


def record(image_id: str = "sa_1", regions: list[Region] | None = None, **fields: Any) -> ImageRecord:
    return ImageRecord(
        image_id=image_id, shard_id="sa_000000", width=W, height=H, image=IMAGE,
        regions=regions or [], fields=dict(fields),
    )  # fmt: skip


def dets(member: str, rows: list[tuple[list[float], float, str]]) -> Detections:
    if not rows:
        return Detections.empty(member)
    boxes = np.asarray([r[0] for r in rows], np.float32)
    return Detections(boxes, np.asarray([r[1] for r in rows], np.float32), [r[2] for r in rows], member)


def region(box: list[int], score: float = 0.9) -> Region:
    mask = np.zeros((H, W), bool)
    x1, y1, x2, y2 = box
    mask[y1:y2, x1:x2] = True
    return Region(bbox=np.asarray(box, np.float32), rle=rle.encode(mask)[0], score=score)


def obj(box: list[float], label: str = "cup", score: float = 0.9) -> dict[str, Any]:
    return new_object(box, [label], label, score, ["a"])


def vote(cfg: GrandConfig, candidates: dict[str, Detections]) -> ImageRecord:
    rec = record(candidates=candidates)
    VoteStage(cfg, FakeHub()).process([rec])
    return rec


def common_columns(rec: ImageRecord) -> dict[str, Any]:
    """The columns every level's row carries (normally written by the engine)."""
    return {
        "image_id": rec.image_id, "shard_id": rec.shard_id, "file_name": rec.file_name,
        "width": rec.width, "height": rec.height, "status": rec.status, "error": rec.error,
        "error_stage": rec.error_stage,
        "provenance": {"config_hash": "test", "backends": rec.backends, "prompt_versions": []},
    }  # fmt: skip


# ----------------------------------------------------------------------------- tags and detect


def test_tags_keep_top_k_above_threshold_best_first():
    tagger = FakeTagger([Tag("table", 0.3), Tag("cup", 0.9), Tag("noise", 0.05), Tag("saucer", 0.5)])
    stage = TagStage(make_cfg(tag_top_k=2, tag_threshold=0.1), FakeHub(tagger=tagger))
    recs = [record("sa_1"), record("sa_2")]
    stage(recs)
    assert [r.fields["tags"] for r in recs] == [
        [{"name": "cup", "score": 0.9}, {"name": "saucer", "score": 0.5}]
    ] * 2
    assert recs[0].backends == [
        {
            "stage": "tags",
            "role": "tagger",
            "backend": "fake_tagger",
            "model_id": "fake-tagger",
            "heuristic": False,
            "weights": "",
        }
    ]


def test_detect_runs_every_member_with_tags_and_regions_as_context():
    regions = [region([10, 10, 100, 100])]
    a = FakeDetector("a", [dets("x", [([1, 2, 3, 4], 0.5, "cup")])])
    b = FakeDetector("b", [Detections.empty("whatever")])
    stage = DetectStage(make_cfg(), FakeHub(detectors__a=a, detectors__b=b))
    rec = record(regions=regions, tags=[{"name": "cup", "score": 0.9}])
    stage([rec])
    assert rec.ok, rec.error
    assert a.contexts == [[{"tags": ["cup"], "regions": regions}]]
    found = rec.fields["detections"]
    assert list(found) == ["a", "b"] and found["a"].model == "a" and found["b"].model == "b"
    assert found["a"].labels == ["cup"] and len(found["b"]) == 0
    assert [(u["stage"], u["model_id"]) for u in rec.backends] == [("detect", "fake-a"), ("detect", "fake-b")]


# ----------------------------------------------------------------------------- nms


def nms_candidates(cfg: GrandConfig, detections: dict[str, Detections]) -> dict[str, Detections]:
    rec = record(detections=detections)
    NmsStage(cfg, FakeHub()).process([rec])
    return rec.fields["candidates"]


def test_nms_is_class_agnostic_within_a_member_and_uses_member_thresholds():
    cfg = make_cfg(score_thresholds={"a": 0.5})
    out = nms_candidates(
        cfg,
        {
            "a": dets("a", [([0, 0, 100, 100], 0.9, "cup"), ([1, 1, 100, 100], 0.8, "mug"),
                            ([200, 200, 300, 300], 0.4, "plate")]),
            "b": dets("b", [([200, 200, 300, 300], 0.15, "plate"), ([0, 0, 50, 50], 0.05, "cup"),
                            ([1, 1, 100, 100], 0.3, "mug")]),
        },
    )  # fmt: skip
    # "mug" overlaps "cup" at IoU 0.98 inside member a and goes although its class differs;
    # a's 0.4 plate misses a's 0.5 threshold; b keeps its 0.15 plate at the default 0.1.
    assert out["a"].labels == ["cup"]
    assert out["b"].labels == ["mug", "plate"]  # b's mug is not suppressed by a's cup
    np.testing.assert_allclose(out["b"].scores, [0.3, 0.15])


def test_nms_person_floor_only_for_promoting_members_and_synonyms_rewritten():
    cfg = make_cfg(score_thresholds={"a": 0.6, "b": 0.6}, person=PersonRules(promote={"a": 0.5}))
    detections = {
        "a": dets("a", [([0, 0, 50, 100], 0.3, "Man"), ([100, 0, 150, 100], 0.3, "dog")]),
        "b": dets("b", [([0, 0, 50, 100], 0.3, "woman"), ([200, 0, 250, 100], 0.7, "men")]),
    }
    out = nms_candidates(cfg, detections)
    assert out["a"].labels == ["person"]  # 0.3 passes min(0.6, 0.2); the dog does not
    assert out["b"].labels == ["person"] and float(out["b"].scores[0]) == pytest.approx(0.7)
    # The floor is read from config when PersonRules grows a ``floor`` key.
    cfg.level1.person.floor = 0.35
    assert len(nms_candidates(cfg, detections)["a"]) == 0


# ----------------------------------------------------------------------------- vote

AGREE = {
    "a": dets("a", [([10, 10, 110, 110], 0.6, "cup"), ([300, 200, 400, 300], 0.7, "plate")]),
    "b": dets("b", [([14, 14, 114, 114], 0.9, "mug")]),
}


def test_vote_two_members_make_an_object_with_union_labels_and_weighted_box():
    rec = vote(make_cfg(), AGREE)
    (cup,) = rec.fields["objects"]
    # a is first in priority, so its box anchors the group and gives the score; b scores higher,
    # so it leads the labels. Box = (0.6 * 10 + 0.9 * 14) / 1.5 = 12.4 per coordinate.
    assert cup["bbox"] == [12.4, 12.4, 112.4, 112.4]
    assert cup["labels"] == ["mug", "cup"] and cup["label"] == "mug"
    assert cup["score"] == 0.6 and cup["models"] == ["a", "b"]
    assert set(cup) == set(OBJECT_KEYS)
    assert cup["attributes"] == [] and cup["depth"] is None and cup["segmentation"] is None
    (plate,) = rec.fields["floating_objects"]  # seen by a only
    assert plate["bbox"] == [300.0, 200.0, 400.0, 300.0] and plate["models"] == ["a"]
    assert [cup["id"], plate["id"]] == [0, 1]


def test_vote_anchor_fusion_keeps_the_anchor_box_and_vote_order_picks_the_anchor():
    anchored = vote(make_cfg(box_fusion="anchor"), AGREE).fields["objects"][0]
    assert anchored["bbox"] == [10.0, 10.0, 110.0, 110.0]
    rec = vote(make_cfg(box_fusion="anchor", vote_order=["b", "a"]), AGREE)
    assert rec.fields["objects"][0]["bbox"] == [14.0, 14.0, 114.0, 114.0]
    assert rec.fields["objects"][0]["score"] == 0.9 and rec.fields["objects"][0]["models"] == ["b", "a"]


def test_vote_min_models_three_leaves_a_pair_floating():
    rec = vote(make_cfg(members=("a", "b", "c"), min_models=3), AGREE)
    assert rec.fields["objects"] == [] and len(rec.fields["floating_objects"]) == 2


def test_vote_person_rules_promote_drop_and_float():
    cfg = make_cfg(
        members=("a", "b", "c"),
        person=PersonRules(promote={"a": 0.5}, drop_unmatched_from=["b"]),
    )
    rec = vote(
        cfg,
        {
            "a": dets("a", [([0, 0, 50, 100], 0.7, "person"), ([100, 0, 150, 100], 0.4, "person")]),
            "b": dets("b", [([300, 0, 350, 100], 0.9, "person"), ([400, 0, 450, 100], 0.9, "cup")]),
            "c": dets("c", [([500, 0, 550, 100], 0.5, "person")]),
        },
    )
    assert [o["bbox"][0] for o in rec.fields["objects"]] == [0.0]  # confident person of a
    # a's weak person and c's person float; b's unmatched person is dropped, its cup floats.
    assert sorted(o["bbox"][0] for o in rec.fields["floating_objects"]) == [100.0, 400.0, 500.0]


def test_vote_ids_are_sequential_and_independent_of_input_order():
    rows_a = [([0, 0, 50, 50], 0.5, "cup"), ([100, 0, 150, 50], 0.5, "cup"), ([200, 0, 250, 50], 0.9, "plate"),
              ([300, 0, 350, 50], 0.8, "mug")]  # fmt: skip
    rows_b = [([200, 0, 250, 50], 0.6, "plate"), ([300, 0, 350, 50], 0.95, "mug")]
    first = vote(make_cfg(), {"a": dets("a", rows_a), "b": dets("b", rows_b)})
    second = vote(make_cfg(), {"b": dets("b", rows_b[::-1]), "a": dets("a", rows_a[::-1])})
    for rec in (first, second):
        everything = rec.fields["objects"] + rec.fields["floating_objects"]
        assert [o["id"] for o in everything] == list(range(4))
    assert first.fields["objects"] == second.fields["objects"]
    assert first.fields["floating_objects"] == second.fields["floating_objects"]
    assert [o["label"] for o in first.fields["objects"]] == ["plate", "mug"]  # 0.9 then 0.8 (anchor scores)
    # Equal scores: ordered by box.
    assert [o["bbox"][0] for o in first.fields["floating_objects"]] == [0.0, 100.0]


# ----------------------------------------------------------------------------- masks


def test_masks_prefer_sa1b_and_segment_only_the_rest_once_per_image():
    segmenter = FakeSegmenter()
    stage = MaskStage(make_cfg(mask_iou=0.65), FakeHub(segmenter=segmenter))
    sa1b = region([100, 100, 200, 200])
    recs = [
        record("sa_1", regions=[sa1b], objects=[obj([102, 102, 200, 200]), obj([300, 50, 360, 150])],
               floating_objects=[obj([400, 300, 500, 380])]),
        record("sa_2", objects=[obj([10, 10, 40, 40])], floating_objects=[]),
    ]  # fmt: skip
    stage(recs)
    assert all(r.ok for r in recs), [r.error for r in recs]
    matched, own, floating = recs[0].fields["objects"] + recs[0].fields["floating_objects"]
    assert matched["segmentation"] == sa1b.rle and matched["segmentation_source"] == "sa1b"
    assert matched["bbox"] == [102.0, 102.0, 200.0, 200.0]  # the fused box is kept, not the mask's
    assert own["segmentation_source"] == floating["segmentation_source"] == "segmenter:fake_segmenter"
    assert int(rle.area([own["segmentation"]])[0]) == 60 * 100
    # One call per image, holding only the objects without an SA-1B match.
    assert len(segmenter.calls) == 2
    np.testing.assert_array_equal(segmenter.calls[0], [[300, 50, 360, 150], [400, 300, 500, 380]])
    np.testing.assert_array_equal(segmenter.calls[1], [[10, 10, 40, 40]])


def test_masks_reject_an_sa1b_mask_that_spills_out_of_the_box():
    segmenter = FakeSegmenter()
    blob = np.zeros((H, W), bool)
    blob[0:200, 0:200] = True  # box [0,0,200,200] matches the object box at IoU 0.72 ...
    blob[150:200, 0:50] = True
    spilling = region([0, 0, 200, 200])
    spilling.rle = rle.encode(blob)[0]
    rec = record(regions=[spilling], objects=[obj([30, 30, 200, 200])], floating_objects=[])
    MaskStage(make_cfg(mask_iou=0.65, mask_containment=0.8), FakeHub(segmenter=segmenter))([rec])
    # ... but 27.75% of its pixels lie outside it, so the segmenter is asked instead.
    assert rec.fields["objects"][0]["segmentation_source"] == "segmenter:fake_segmenter"
    assert len(segmenter.calls) == 1


def test_masks_bad_segmenter_output_becomes_an_error_row():
    class Broken(FakeSegmenter):
        def segment(self, image, boxes):
            return np.zeros((1, 4, 4), bool)

    rec = record(objects=[obj([10, 10, 40, 40])], floating_objects=[])
    MaskStage(make_cfg(), FakeHub(segmenter=Broken()))([rec])
    assert not rec.ok and rec.error_stage == "masks" and "shape" in rec.error


# ----------------------------------------------------------------------------- attributes and depth


def test_attributes_describe_objects_with_masks_and_leftover_regions():
    captioner = FakeCaptioner()
    cfg = make_cfg(region_min_area=0.01, floating_attribute_iou=0.65)
    half = np.zeros((H, W), bool)
    half[100:200, 100:150] = True  # left half of the object's box
    masked = obj([100, 100, 200, 200])
    masked["segmentation"] = rle.encode(half)[0]
    regions = [
        region([100, 100, 200, 200], 0.8),  # covered by the masked object: not floating
        region([300, 100, 400, 250], 0.7),  # big and free: a floating attribute
        region([500, 10, 510, 20], 0.99),  # free but below 1% of the image
    ]
    rec = record(regions=regions, objects=[masked], floating_objects=[obj([0, 300, 40, 340])])
    AttributeStage(cfg, FakeHub(region_captioner=captioner))([rec])
    assert rec.ok, rec.error
    assert captioner.calls == 1
    assert masked["attributes"] == ["5000 px"]  # the mask, not the 10000 px box
    assert rec.fields["floating_objects"][0]["attributes"] == ["1600 px"]  # no mask: box fallback
    assert rec.fields["floating_attributes"] == [
        {"bbox": [300.0, 100.0, 400.0, 250.0], "description": "15000 px", "score": 0.7}
    ]


def test_depth_is_the_median_inside_the_mask_and_source_is_labelled():
    left = np.zeros((H, W), bool)
    left[100:200, 100:150] = True  # columns 100..149: median column 124.5
    masked = obj([100, 100, 200, 200])
    masked["segmentation"] = rle.encode(left)[0]
    boxed = obj([0, 0, 11, 10])  # no mask: box columns 0..10, median 5
    recs = [
        record("sa_1", objects=[masked], floating_objects=[boxed]),
        record("sa_2", objects=[], floating_objects=[]),
    ]
    DepthStage(make_cfg(), FakeHub(depth=FakeDepth()))(recs)
    assert all(r.ok for r in recs)
    assert masked["depth"] == 124.5 and boxed["depth"] == 5.0
    assert recs[0].fields["depth_source"] == recs[1].fields["depth_source"] == "fake-depth (heuristic)"
    assert recs[0].backends[0]["heuristic"] is True
    # The low-res copy: longest side 64 cells, each the mean of its columns' indices.
    lowres = recs[0].fields["depth_lowres"]
    height, width = lowres["height"], lowres["width"]
    assert max(height, width) == 64 and abs(height / width - H / W) < 0.02
    cells = np.asarray(lowres["values"], np.float32).reshape(height, width)
    edges = np.arange(width + 1) * W // width
    np.testing.assert_allclose(cells[0], (edges[:-1] + edges[1:] - 1) / 2, rtol=1e-6)
    assert (cells == cells[0]).all()


# ----------------------------------------------------------------------------- level spec and rows


def run_level(recs: list[ImageRecord], regions_hub: FakeHub, cfg: GrandConfig) -> None:
    for stage_cls in STAGES:
        stage_cls(cfg, regions_hub)(recs)


def test_full_level_rows_validate_against_the_level_schema():
    cfg = make_cfg(person=PersonRules(promote={"a": 0.5}))
    hub = FakeHub(
        tagger=FakeTagger([Tag("cup", 0.9), Tag("saucer", 0.4)]),
        detectors__a=FakeDetector("a", [AGREE["a"], AGREE["a"]]),
        detectors__b=FakeDetector("b", [AGREE["b"], AGREE["b"]]),
        segmenter=FakeSegmenter(),
        region_captioner=FakeCaptioner(),
        depth=FakeDepth(),
    )
    recs = [record("sa_1", regions=[region([10, 10, 110, 110]), region([400, 50, 550, 150])]), record("sa_2")]
    run_level(recs, hub, cfg)
    assert all(r.ok for r in recs), [r.error for r in recs]
    failed = record("sa_3")
    failed.fail("detect", "boom")
    rows = [{**common_columns(r), **to_row(r)} for r in [*recs, failed]]
    table = pa.Table.from_pylist(rows, schema=level_schema(1))
    assert table.num_rows == 3
    first = table.to_pylist()[0]
    (cup,) = first["objects"]
    assert cup["segmentation_source"] == "sa1b" and cup["attributes"] == ["10000 px"] and cup["depth"] == 59.5
    assert first["floating_objects"][0]["segmentation_source"] == "segmenter:fake_segmenter"
    assert [a["bbox"] for a in first["floating_attributes"]] == [[400.0, 50.0, 550.0, 150.0]]
    assert first["depth_source"] == "fake-depth (heuristic)"
    assert {u["stage"] for u in first["provenance"]["backends"]} == {
        "tags", "detect", "masks", "attributes", "depth",
    }  # fmt: skip
    assert table.to_pylist()[2]["objects"] == [] and table.to_pylist()[2]["depth_source"] is None


def test_stages_fill_every_object_key():
    # Outputs against the schema: tests/test_stage_contracts.py, for every level.
    filled = {key for stage in STAGES for key in getattr(stage, "fills", ())}
    assert filled == set(OBJECT_KEYS) == {OBJECT.field(i).name for i in range(OBJECT.num_fields)}
    assert LEVELS.get("1") is LEVEL1 and LEVEL1.stages == STAGES and LEVEL1.needs_pixels


def test_region_captioner_role_method_does_not_shadow_provenance():
    assert RegionCaptioner.describe is Backend.describe
