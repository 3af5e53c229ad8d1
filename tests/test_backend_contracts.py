"""One contract test per registered backend: build its tiny variant, run its role on a real photo.

The cases are generated from ``roles.BACKENDS``, so registering a backend adds it here. A role
without an entry in ``CONTRACTS`` fails, asking the author of the new role to write its contract.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import skimage.data
from PIL import Image

import grand_pipeline.models.backends  # noqa: F401  (registers the built-in backends)
from grand_pipeline.config import ModelsConfig, ModelSpec
from grand_pipeline.geometry import rle
from grand_pipeline.models import roles
from grand_pipeline.models.hub import ModelHub


@pytest.fixture(scope="session")
def tiny_cache() -> str:
    """The session's private weights cache (tests/conftest.py), shared with the other tests so
    tiny models and the converted lite LLM are built once per session."""
    return os.environ["GRAND_CACHE_DIR"]


@pytest.fixture(scope="session")
def hub(tiny_cache: str) -> ModelHub:
    """The real ModelHub, every role on its tiny (random-weights) variant."""
    models = ModelsConfig(
        tagger=ModelSpec("efficientnet_lite", "tiny:0"),
        detectors={
            "nanodet": ModelSpec("nanodet_onnx", "tiny:0"),
            "region_tagger": ModelSpec("region_tagger", options={"tagger": "tagger", "min_area": 0.0}),
        },
        segmenter=ModelSpec("litemedsam", "tiny:0"),
        depth=ModelSpec("ground_plane"),
        region_captioner=ModelSpec("colour_tagger", options={"tagger": "tagger"}),
        text_embedder=ModelSpec("minilm", "tiny:0"),
        llm=ModelSpec("gguf_transformers", "tiny:0", batch_size=4),
        phrase_extractor=ModelSpec("spacy"),
    )
    return ModelHub(models)


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """skimage's coffee photo at 200x300, uint8 (H, W, 3) RGB."""
    return np.asarray(Image.fromarray(skimage.data.coffee()).resize((300, 200), Image.BILINEAR))


# Boxes (xyxy) on the 200x300 photo: the cup, the saucer's lower left, a sliver at the border.
BOXES = np.array([[70, 5, 215, 200], [30, 90, 160, 195], [0, 0, 12, 40]], np.float32)


def _box_masks(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    masks = np.zeros((len(boxes), height, width), bool)
    for m, (x1, y1, x2, y2) in zip(masks, boxes.astype(int), strict=True):
        m[y1:y2, x1:x2] = True
    return masks


def check_tagger(backend: Any, image: np.ndarray) -> None:
    tags = backend.tag([image, image[:, ::-1]])
    assert isinstance(tags, list) and len(tags) == 2
    for per_image in tags:
        assert isinstance(per_image, list)
        assert all(isinstance(t, roles.Tag) and isinstance(t.name, str) and t.name for t in per_image)
        scores = [t.score for t in per_image]
        assert all(0.0 <= s <= 1.0 for s in scores) and scores == sorted(scores, reverse=True)
    crops = [image[y1:y2, x1:x2] for x1, y1, x2, y2 in BOXES.astype(int)]
    top = backend.classify_crops(crops, top_k=2)
    assert len(top) == len(crops) and all(len(t) == 2 for t in top)
    assert all(t[0].score >= t[1].score for t in top)


def check_detector(backend: Any, image: np.ndarray) -> None:
    height, width = image.shape[:2]
    masks = _box_masks(BOXES, height, width)
    regions = [roles.Region(b, r) for b, r in zip(BOXES, rle.encode(masks), strict=True)]
    context = [{"tags": [roles.Tag("cup", 0.9)], "regions": regions}]
    out = backend.detect([image], context)
    assert isinstance(out, list) and len(out) == 1
    det = out[0]
    assert isinstance(det, roles.Detections)
    n = len(det)
    assert det.boxes.shape == (n, 4) and det.boxes.dtype == np.float32
    assert det.scores.shape == (n,) and det.scores.dtype == np.float32
    assert all(isinstance(label, str) and label for label in det.labels)
    if n:
        assert np.isfinite(det.boxes).all() and (det.boxes[:, 2:] >= det.boxes[:, :2]).all()
        assert det.boxes[:, [0, 2]].max() <= width and det.boxes[:, [1, 3]].max() <= height
    assert backend.detect([], None) == []


def check_segmenter(backend: Any, image: np.ndarray) -> None:
    height, width = image.shape[:2]
    masks = backend.segment(image, BOXES)
    assert isinstance(masks, np.ndarray) and masks.dtype == bool
    assert masks.shape == (len(BOXES), height, width)
    assert backend.segment(image, np.zeros((0, 4), np.float32)).shape == (0, height, width)


def check_depth(backend: Any, image: np.ndarray) -> None:
    out = backend.depth([image, image[:100]])
    assert isinstance(out, list) and len(out) == 2
    for d, img in zip(out, [image, image[:100]], strict=True):
        assert isinstance(d, np.ndarray) and d.dtype == np.float32 and d.shape == img.shape[:2]
        assert np.isfinite(d).all()


def check_region_captioner(backend: Any, image: np.ndarray) -> None:
    height, width = image.shape[:2]
    masks = _box_masks(BOXES, height, width)
    masks[1] = False  # an empty mask falls back to the box pixels
    for m in (masks, None):
        phrases = backend.describe_regions(image, BOXES, m)
        assert isinstance(phrases, list) and len(phrases) == len(BOXES)
        assert all(isinstance(p, str) and p.strip() for p in phrases)
    assert backend.describe_regions(image, np.zeros((0, 4), np.float32), None) == []


def check_text_embedder(backend: Any, image: np.ndarray) -> None:  # noqa: ARG001
    texts = ["a cup of coffee", "a saucer on a wooden table", "a motorcycle"]
    emb = backend.embed(texts)
    assert isinstance(emb, np.ndarray) and emb.dtype == np.float32
    assert emb.ndim == 2 and emb.shape[0] == len(texts) and emb.shape[1] > 0
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(backend.embed(texts[:1]), emb[:1], atol=1e-5)


OBJECTS = [
    {"id": 0, "bbox": [70.0, 5.0, 215.0, 200.0], "label": "cup", "labels": ["cup", "espresso"],
     "attributes": ["white cup"]},
    {"id": 1, "bbox": [0.0, 0.0, 12.0, 40.0], "label": "table", "labels": ["table"], "attributes": []},
]  # fmt: skip


def check_llm(backend: Any, image: np.ndarray) -> None:  # noqa: ARG001
    ok = roles.ChatPrompt([{"role": "user", "content": "Name one colour."}], max_new_tokens=4)
    huge = roles.ChatPrompt([{"role": "user", "content": "word " * 50_000}], max_new_tokens=4)
    assert isinstance(backend.count_tokens(ok), int) and backend.count_tokens(ok) > 0
    out = backend.generate([ok, huge, ok])
    assert len(out) == 3 and all(isinstance(g, roles.Generation) for g in out)
    assert out[1].finish_reason == "error" and out[1].error
    assert all(g.finish_reason in ("stop", "length", "error") for g in out)


def check_captioner(backend: Any, image: np.ndarray) -> None:
    context = [{"tags": ["espresso", "cup"], "objects": ["cup"]}, {"tags": [], "objects": []}]
    out = backend.caption([image, image], context)
    assert isinstance(out, list) and len(out) == 2
    assert all(isinstance(c, str) for per_image in out for c in per_image)


def check_phrase_extractor(backend: Any, image: np.ndarray) -> None:  # noqa: ARG001
    texts = ["A white cup of coffee sits on a wooden table.", ""]
    out = backend.phrases(texts)
    assert len(out) == 2 and out[1] == []
    for phrase in out[0] + backend.nouns(texts[0]):
        assert isinstance(phrase, roles.Phrase) and texts[0][phrase.start : phrase.end] == phrase.text


def check_grounder(backend: Any, image: np.ndarray) -> None:
    out = backend.ground(image, ["the cup", "a table"], OBJECTS)
    assert len(out) == 2
    for grounding in out:
        assert grounding is None or (isinstance(grounding, roles.Grounding) and grounding.box.shape == (4,))


def check_landmark_classifier(backend: Any, image: np.ndarray) -> None:
    from grand_pipeline.taxonomy import LANDMARKS

    out = backend.classify([image, None], ["espresso cup on a table", "a road with cars"])
    assert len(out) == 2
    for category, fine, score in out:
        assert fine in LANDMARKS[category] and isinstance(score, float)


def check_label_assigner(backend: Any, image: np.ndarray) -> None:
    boxes = np.asarray([o["bbox"] for o in OBJECTS], np.float32)
    out = backend.assign(image, boxes, [o["labels"] for o in OBJECTS], "a cup of espresso")
    assert len(out) == 2 and all(label in o["labels"] for label, o in zip(out, OBJECTS, strict=True))


CONTRACTS: dict[str, Callable[[Any, np.ndarray], None]] = {
    "llm": check_llm,
    "captioner": check_captioner,
    "phrase_extractor": check_phrase_extractor,
    "grounder": check_grounder,
    "landmark_classifier": check_landmark_classifier,
    "label_assigner": check_label_assigner,
    "tagger": check_tagger,
    "detector": check_detector,
    "segmenter": check_segmenter,
    "depth": check_depth,
    "region_captioner": check_region_captioner,
    "text_embedder": check_text_embedder,
}


def _cases() -> list[Any]:
    return [
        pytest.param(role, name, id=f"{role}:{name}")
        for role in roles.ROLES
        for name in roles.BACKENDS[role].names()
    ]


#: Backends that need a service or a GPU package; their own tests cover what runs here
#: (tests/test_llm.py runs the openai backend against a loopback server).
REMOTE = {
    "openai": "needs an OpenAI-compatible server; covered by tests/test_llm.py",
    "vllm": "needs the vllm package on a GPU node; its clear failure is tested in tests/test_llm.py",
}


@pytest.mark.parametrize(("role", "name"), _cases())
def test_backend_contract(role: str, name: str, hub: ModelHub, photo: np.ndarray) -> None:
    contract = CONTRACTS.get(role)
    if contract is None:
        pytest.fail(
            f"backend {name!r} implements role {role!r}, which has no contract yet: "
            "add a check_<role> function to CONTRACTS in tests/test_backend_contracts.py"
        )
    if name in REMOTE:
        pytest.skip(REMOTE[name])
    cls = roles.BACKENDS[role].get(name)
    backend = cls(ModelSpec(backend=name, model="tiny:0"), hub=hub)
    info = backend.describe()
    assert info["backend"] == name and info["role"] == role
    assert isinstance(info["model_id"], str) and info["model_id"]
    assert isinstance(info["weights"], str) and isinstance(info["heuristic"], bool)
    contract(backend, photo)


def test_every_builtin_backend_is_covered() -> None:
    """The lite stack's backends are all registered, so the cases above exercise them."""
    expected = {
        "tagger": "efficientnet_lite",
        "detector": "nanodet_onnx",
        "segmenter": "litemedsam",
        "depth": "ground_plane",
        "region_captioner": "colour_tagger",
        "text_embedder": "minilm",
    }
    for role, name in expected.items():
        assert name in roles.BACKENDS[role], f"{role}:{name} is not registered"
    assert "region_tagger" in roles.BACKENDS["detector"]
