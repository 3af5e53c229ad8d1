"""NanoDet ONNX detector (real committed weights and the tiny random graph) and the region tagger."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import skimage.data

from grand_pipeline.config import ModelSpec
from grand_pipeline.geometry.boxes import box_iou
from grand_pipeline.models import weights
from grand_pipeline.models.backends.nanodet import NanoDetONNX, build_tiny_nanodet, gfl_decode
from grand_pipeline.models.backends.region_tagger import RegionTagger, padded_crop_box
from grand_pipeline.models.roles import BACKENDS, Detections, Region, Tag

ASSETS = Path(__file__).resolve().parents[1] / "grand_pipeline" / "assets"
COCO = json.loads((ASSETS / "coco80_labels.json").read_text())


@pytest.fixture(scope="module")
def nanodet() -> NanoDetONNX:
    return NanoDetONNX(ModelSpec(backend="nanodet_onnx", options={"threads": 2}))


def best(dets: Detections, label: str) -> tuple[float, np.ndarray]:
    idx = [i for i, name in enumerate(dets.labels) if name == label]
    assert idx, f"no {label!r} in {dets.labels}"
    i = max(idx, key=lambda j: dets.scores[j])
    return float(dets.scores[i]), dets.boxes[i]


def check_well_formed(dets: Detections, image: np.ndarray) -> None:
    h, w = image.shape[:2]
    n = len(dets)
    assert dets.boxes.shape == (n, 4) and dets.boxes.dtype == np.float32
    assert dets.scores.shape == (n,) and dets.scores.dtype == np.float32
    assert all(label in COCO for label in dets.labels)
    assert np.all(dets.boxes[:, 0::2] >= 0) and np.all(dets.boxes[:, 0::2] <= w)
    assert np.all(dets.boxes[:, 1::2] >= 0) and np.all(dets.boxes[:, 1::2] <= h)
    assert np.all(dets.boxes[:, 2:] >= dets.boxes[:, :2])


# --- real NanoDet-m ----------------------------------------------------------------------------


def test_registered_and_described(nanodet: NanoDetONNX) -> None:
    assert BACKENDS["detector"].get("nanodet_onnx") is NanoDetONNX
    info = nanodet.describe()
    assert info["backend"] == "nanodet_onnx" and info["model_id"] == "nanodet-m-416"
    assert info["weights"] == weights.sha256_of(ASSETS / "nanodet-m-416.onnx")
    assert [stride for stride, _, _ in nanodet._heads] == [8, 16, 32]


@pytest.mark.parametrize(
    ("name", "label", "expected", "min_iou"),
    [
        ("astronaut", "person", [14, 14, 364, 507], 0.8),
        ("coffee", "cup", [147, 10, 426, 398], 0.7),
        ("motorcycle", "motorcycle", [105, 74, 687, 453], 0.8),
    ],
)
def test_real_photos(
    nanodet: NanoDetONNX, name: str, label: str, expected: list[int], min_iou: float
) -> None:
    image = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    dets = nanodet.detect([image])[0]
    check_well_formed(dets, image)
    assert dets.model == "nanodet"
    score, box = best(dets, label)
    assert score > 0.5
    assert box_iou(box[None], np.array([expected], np.float32))[0, 0] > min_iou
    assert np.all(dets.scores >= 0.35)


def test_rocket_has_nothing(nanodet: NanoDetONNX) -> None:
    dets = nanodet.detect([skimage.data.rocket()])[0]
    assert len(dets) == 0 and dets.boxes.shape == (0, 4)


def test_batch_matches_single_calls(nanodet: NanoDetONNX) -> None:
    images = [skimage.data.coffee(), skimage.data.astronaut(), skimage.data.chelsea()]
    batched = nanodet.detect(images)
    assert len(batched) == 3
    for image, dets in zip(images, batched, strict=True):
        single = nanodet.detect([image])[0]
        assert dets.labels == single.labels
        np.testing.assert_allclose(dets.boxes, single.boxes, atol=1e-3)
        np.testing.assert_allclose(dets.scores, single.scores, atol=1e-5)
    assert "cup" in batched[0].labels and "person" in batched[1].labels
    assert nanodet.detect([]) == []


def test_thresholds_and_max_detections() -> None:
    image = skimage.data.chelsea()
    loose = NanoDetONNX(
        ModelSpec(backend="nanodet_onnx", options={"score_threshold": 0.05, "max_detections": 5})
    )
    dets = loose.detect([image])[0]
    assert len(dets) == 5
    assert np.all(np.diff(dets.scores) <= 0)  # best first
    # Class-wise NMS: no two kept boxes of the same class overlap above the NMS IoU.
    for label in set(dets.labels):
        same = dets.boxes[[i for i, n in enumerate(dets.labels) if n == label]]
        iou = box_iou(same, same) - np.eye(len(same))
        assert np.all(iou <= 0.5 + 1e-6)


def test_bad_image_is_one_clear_error(nanodet: NanoDetONNX) -> None:
    with pytest.raises(ValueError, match="RGB uint8 image"):
        nanodet.detect([np.zeros((32, 32), np.uint8)])


def test_gfl_decode() -> None:
    # Uniform bins -> expectation 5 bins on every side; a peaked bin 0 -> a point at the centre.
    uniform = gfl_decode(np.zeros((4, 44), np.float32), stride=8, size=16)
    centres = np.array([[4, 4], [12, 4], [4, 12], [12, 12]], np.float32)
    np.testing.assert_allclose(uniform, np.concatenate([centres - 40, centres + 40], axis=1), atol=1e-4)
    peaked = np.full((4, 4, 11), -50.0, np.float32)
    peaked[:, :, 0] = 50.0
    point = gfl_decode(peaked.reshape(4, 44), stride=8, size=16)
    np.testing.assert_allclose(point, np.concatenate([centres, centres], axis=1), atol=1e-4)


# --- tiny random graph -------------------------------------------------------------------------


def test_tiny_model_same_interface_and_deterministic(tmp_path: Path, monkeypatch, nanodet) -> None:
    import onnxruntime as ort

    monkeypatch.setenv("GRAND_CACHE_DIR", str(tmp_path / "a"))
    first = weights.resolve("tiny:0", name="nanodet_onnx", tiny_builder=build_tiny_nanodet)
    monkeypatch.setenv("GRAND_CACHE_DIR", str(tmp_path / "b"))
    second = weights.resolve("tiny:0", name="nanodet_onnx", tiny_builder=build_tiny_nanodet)
    other = weights.resolve("tiny:1", name="nanodet_onnx", tiny_builder=build_tiny_nanodet)
    assert re.fullmatch(r"[0-9a-f]{64}", first.sha256)
    assert first.sha256 == second.sha256 != other.sha256
    assert (first.path / "model.onnx").stat().st_size < 200_000

    tiny = ort.InferenceSession(str(first.path / "model.onnx"), providers=["CPUExecutionProvider"])
    real = nanodet.session
    assert [(i.name, i.shape) for i in tiny.get_inputs()] == [(i.name, i.shape) for i in real.get_inputs()]
    assert sorted(o.shape for o in tiny.get_outputs()) == sorted(o.shape for o in real.get_outputs())


def test_tiny_model_runs_through_the_same_backend(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("GRAND_CACHE_DIR", str(tmp_path))
    spec = ModelSpec(backend="nanodet_onnx", model="tiny:0", options={"score_threshold": 0.0})
    det = NanoDetONNX(spec)
    assert det.backend == "nanodet_onnx" and det.model_id == "nanodet-tiny-random"
    assert re.fullmatch(r"[0-9a-f]{64}", det.weights_id)
    assert det.weights_id == weights.sha256_of(tmp_path / "tiny" / "nanodet_onnx-seed0")
    images = [skimage.data.astronaut(), skimage.data.coffee()]
    out = det.detect(images)
    assert len(out) == 2
    for image, dets in zip(images, out, strict=True):
        check_well_formed(dets, image)
        assert 0 < len(dets) <= 100 and dets.model == "nanodet"
    # Outputs depend on the input: different photos give different detections.
    assert not np.allclose(out[0].scores[:10], out[1].scores[:10])


# --- region tagger (with a fake tagger: only the region logic is under test here) --------------


class FakeTagger:
    """Returns a fixed tag per crop and records each call; not a model."""

    model_id = "fake-tagger"
    weights_id = "f" * 64

    def __init__(self, score: float = 0.8) -> None:
        self.calls: list[list[tuple[int, ...]]] = []
        self.score = score

    def classify_crops(self, crops: list[np.ndarray], top_k: int = 1) -> list[list[Tag]]:
        assert top_k == 1
        self.calls.append([c.shape for c in crops])
        # The score encodes the crop width so the filter can be checked per region.
        return [
            [Tag("wide" if c.shape[1] > 100 else "narrow", self.score if c.shape[1] > 30 else 0.05)]
            for c in crops
        ]


class FakeHub:
    def __init__(self, tagger: FakeTagger) -> None:
        self.tagger = tagger
        self.keys: list[str] = []

    def get(self, key: str) -> FakeTagger:
        self.keys.append(key)
        return self.tagger


def region(box: list[float]) -> Region:
    return Region(bbox=np.array(box, np.float32), rle={"size": [200, 300], "counts": ""})


def test_region_tagger_filters_orders_and_batches() -> None:
    tagger = FakeTagger()
    hub = FakeHub(tagger)
    det = RegionTagger(ModelSpec(backend="region_tagger", options={"max_regions": 2}), hub=hub)
    assert hub.keys == ["tagger"] and det.tagger is tagger
    assert det.model_id == "region-tagger(fake-tagger)" and det.weights_id == "f" * 64

    image = np.zeros((200, 300, 3), np.uint8)  # area 60000 -> min area 600 px
    regions = [
        region([0, 0, 20, 20]),  # 400 px: below min_area
        region([10, 10, 60, 60]),  # 2500 px
        region([50, 20, 250, 180]),  # 32000 px: largest
        region([100, 100, 140, 140]),  # 1600 px: dropped by max_regions=2
    ]
    out = det.detect([image, image], [{"regions": regions}, {"regions": []}])
    assert len(out) == 2
    assert len(tagger.calls) == 1 and len(tagger.calls[0]) == 2  # one batched call, empty image skipped
    first = out[0]
    np.testing.assert_array_equal(first.boxes, np.array([[50, 20, 250, 180], [10, 10, 60, 60]], np.float32))
    assert first.labels == ["wide", "narrow"] and first.model == "region_tagger"
    np.testing.assert_allclose(first.scores, [0.8, 0.8])
    # Crops are padded by 10% per side and clipped: 200x160 box -> 240x192.
    assert tagger.calls[0][0] == (192, 240, 3)
    assert len(out[1]) == 0 and out[1].model == "region_tagger"


def test_region_tagger_min_score_and_missing_context() -> None:
    tagger = FakeTagger()
    det = RegionTagger(ModelSpec(backend="region_tagger", options={"context_pad": 0.0}), hub=FakeHub(tagger))
    image = np.zeros((200, 300, 3), np.uint8)
    # A 25 px wide crop gets score 0.05 from the fake tagger, under min_score 0.1.
    out = det.detect([image], [{"regions": [region([0, 0, 25, 190]), region([100, 0, 140, 190])]}])[0]
    np.testing.assert_array_equal(out.boxes, np.array([[100, 0, 140, 190]], np.float32))
    assert det.detect([image])[0].boxes.shape == (0, 4)
    assert det.detect([image], [{}])[0].labels == []


def test_padded_crop_box_clips_and_never_empty() -> None:
    assert padded_crop_box(np.array([10, 10, 110, 60]), 0.1, 100, 100) == (0, 5, 100, 65)
    assert padded_crop_box(np.array([99.5, 99.5, 99.5, 99.5]), 0.1, 100, 100) == (99, 99, 100, 100)
