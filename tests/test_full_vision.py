"""The full profile's vision backends on their tiny random-initialised variants.

Each tiny model is built by its backend's builder into the session cache and loaded back through
the same loader as real weights; these tests check behaviour the role contracts do not pin down.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
from PIL import Image
from pycocotools import mask as mask_utils

from grand_pipeline.config import ModelSpec
from grand_pipeline.geometry import boxed
from grand_pipeline.models.roles import Tag


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return np.asarray(Image.fromarray(skimage.data.coffee()).resize((300, 200), Image.BILINEAR))


def test_sam_one_mask_per_box_and_one_embedding_per_image(photo: np.ndarray) -> None:
    from grand_pipeline.models.backends.sam import SamSegmenter

    sam = SamSegmenter(ModelSpec("sam", "tiny:0", batch_size=2))
    calls: list[tuple[int, ...]] = []
    hook = sam.net.image_encoder.register_forward_hook(lambda m, i, o: calls.append(tuple(o.shape)))
    try:
        boxes = np.array(
            [[70, 5, 215, 200], [30, 90, 160, 195], [0, 0, 12, 40], [10, 10, 290, 190], [5, 5, 50, 50]]
        )
        masks, iou, stability = sam.segment_with_scores(photo, boxes)
        assert masks.shape == (5, 200, 300) and masks.dtype == bool
        assert iou.shape == stability.shape == (5,)
        # Five boxes in three decoder chunks, one image-encoder pass.
        assert len(calls) == 1 and calls[0][0] == 1
        sam.segment(photo[:100], boxes[:1])
        assert len(calls) == 2
    finally:
        hook.remove()
    # Same weights, same prompts -> same masks (the tiny model is deterministic once loaded).
    again = SamSegmenter(ModelSpec("sam", "tiny:0")).segment(photo, boxes[:2])
    np.testing.assert_array_equal(again, masks[:2])
    # The device-side crops Level 1 keeps are the same masks, and encode to pycocotools' RLE.
    kept = sam.segment_boxed(photo, boxes)
    assert kept.shape == masks.shape and kept.device == sam.device
    np.testing.assert_array_equal(np.asarray(kept), masks)
    coco = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    assert [r["counts"] for r in boxed.encode(kept)] == [r["counts"].decode() for r in coco]
    assert sam.segment_boxed(photo, np.zeros((0, 4))).shape == (0, 200, 300)


@pytest.mark.parametrize("family", ["dpt", "depth_anything"])
def test_depth_is_resized_to_each_input(family: str, photo: np.ndarray) -> None:
    from grand_pipeline.models.backends.hf_depth import HFDepth

    depth = HFDepth(ModelSpec("hf_depth", "tiny:0", options={"family": family}))
    assert depth.output == "inverse"  # both families predict relative inverse depth
    images = [photo, photo[:120, :77], photo]
    out = depth.depth(images)
    assert [d.shape for d in out] == [img.shape[:2] for img in images]
    assert all(d.dtype == np.float32 and np.isfinite(d).all() for d in out)
    np.testing.assert_allclose(out[0], out[2], rtol=1e-4, atol=1e-5)  # batched == batched


def test_clip_tagger_scores_the_packaged_vocabulary(photo: np.ndarray) -> None:
    from grand_pipeline.models.backends.clip_tagger import ClipTagger
    from grand_pipeline.models.vision_common import tag_vocabulary

    vocab = tag_vocabulary()
    assert len(vocab) > 1300 and "person" in vocab and "coffee table" in vocab
    assert all(v == v.lower() and "_" not in v for v in vocab) and len(set(vocab)) == len(vocab)
    for family in ("clip", "siglip"):
        tagger = ClipTagger(ModelSpec("clip_tagger", "tiny:0", options={"family": family}))
        assert tagger.text_emb.shape[0] == len(vocab)  # embedded once, at load
        probs = tagger.probabilities([photo, photo[:, ::-1]])
        assert probs.shape == (2, len(vocab))
        if family == "clip":
            np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-4)  # softmax over the vocabulary
        else:
            assert tagger.sigmoid and probs.max() < 1.0
        top = tagger.classify_crops([photo[:50, :50]], top_k=3)[0]
        assert [t.name for t in top] == [
            vocab[i] for i in np.argsort(-tagger.probabilities([photo[:50, :50]])[0], kind="stable")[:3]
        ]


@pytest.mark.parametrize("backend", ["owlv2", "grounding_dino"])
def test_open_vocabulary_labels_follow_the_image_tags(backend: str, photo: np.ndarray) -> None:
    from grand_pipeline.models.roles import BACKENDS

    cls = BACKENDS["detector"].get(backend)
    threshold = {"owlv2": "score_threshold", "grounding_dino": "box_threshold"}[backend]
    det = cls(ModelSpec(backend, "tiny:0", options={threshold: 0.0}))
    context = [{"tags": [Tag("cup", 0.9), Tag("saucer", 0.4)]}, {"tags": ["spoon"]}, {}]
    out = det.detect([photo, photo, photo[:100]], context)
    assert len(out[0]) > 0 and set(out[0].labels) <= {"cup", "saucer"}
    assert len(out[1]) > 0 and set(out[1].labels) == {"spoon"}
    from grand_pipeline.models.vision_common import fallback_queries

    assert set(out[2].labels) <= set(fallback_queries())  # no tags: the COCO-80 fallback


def test_grounding_dino_loads_once_for_both_roles(photo: np.ndarray) -> None:
    from grand_pipeline.config import ModelsConfig
    from grand_pipeline.models.backends.grounding_dino import GroundingDinoDetector, GroundingDinoGrounder
    from grand_pipeline.models.hub import ModelHub

    spec = ModelSpec("grounding_dino", "tiny:0", options={"box_threshold": 0.0})
    unused = ModelSpec("unused")  # the hub loads lazily: only the two keys asked for are built
    models = ModelsConfig(unused, {"gdino": spec}, unused, unused, unused, grounder=spec)
    hub = ModelHub(models)
    detector, grounder = hub.get("detectors.gdino"), hub.get("grounder")
    assert isinstance(detector, GroundingDinoDetector) and isinstance(grounder, GroundingDinoGrounder)
    assert detector.net.model is grounder.net.model  # one model per hub and weights folder
    assert ModelHub(models).get("grounder").net.model is not grounder.net.model  # nothing process-wide
    phrases = [f"phrase {i}" for i in range(11)]  # two prompt chunks of at most 8
    out = grounder.ground(photo, phrases, [])
    assert len(out) == 11 and all(g is not None and g.phrase == p for g, p in zip(out, phrases, strict=True))
    for g in out:
        assert g.box.shape == (4,) and 0 <= g.box[0] <= g.box[2] <= 300 and 0 <= g.box[1] <= g.box[3] <= 200
    assert grounder.ground(None, ["a cup"], []) == [None]


def test_ultralytics_yolo_world_classes_are_the_tags(photo: np.ndarray) -> None:
    from grand_pipeline.models.backends.ultralytics_detector import UltralyticsDetector

    det = UltralyticsDetector(
        ModelSpec("ultralytics", "tiny:0", options={"family": "yoloworld", "score_threshold": 0.0})
    )
    assert det.family == "yoloworld"
    out = det.detect([photo], [{"tags": [Tag("cup", 0.9), Tag("saucer", 0.5)]}])
    assert det.model.model[-1].nc == 2 and det.model.txt_feats.shape[:2] == (1, 2)
    assert len(out[0]) > 0 and set(out[0].labels) <= {"cup", "saucer"}
    out = det.detect([photo, photo], [{"tags": ["cup"]}, {"tags": ["spoon"]}])
    assert set(out[0].labels) <= {"cup"} and set(out[1].labels) <= {"spoon"}


@pytest.mark.parametrize("family", ["yolo", "rtdetr"])
def test_ultralytics_closed_set(family: str, photo: np.ndarray) -> None:
    from grand_pipeline.models.backends.ultralytics_detector import UltralyticsDetector

    det = UltralyticsDetector(
        ModelSpec("ultralytics", "tiny:0", options={"family": family, "score_threshold": 0.0})
    )
    assert det.family == family and len(det.names) == 80
    out = det.detect([photo, photo[:100]], [{"tags": ["cup"]}, {}])  # closed set: tags are ignored
    assert len(out) == 2 and len(out[0]) > 0 and set(out[0].labels) <= set(det.names)
    assert out[1].boxes[:, 3].max() <= 100 and out[1].boxes[:, 2].max() <= 300


def test_ultralytics_checkpoint_export_and_pickle_refusal(photo: np.ndarray, tmp_path) -> None:
    import torch

    from grand_pipeline.models import weights
    from grand_pipeline.models.backends import ultralytics_detector as ud

    folder = weights.resolve("tiny:0", name="ultralytics-yolo", tiny_builder=ud.tiny_builder("yolo")).path
    model, _ = ud.load_folder_model(folder, trust_pickle=False)
    pickled = tmp_path / "yolo.pt"  # the layout of an official checkpoint: a pickled model object
    torch.save({"model": model}, pickled)
    with pytest.raises(weights.ModelSourceError, match="trust_pickle"):
        ud.UltralyticsDetector(ModelSpec("ultralytics", str(pickled)))
    ud.export_checkpoint(pickled, tmp_path / "converted")
    converted, cfg = ud.load_folder_model(tmp_path / "converted", trust_pickle=False)
    assert cfg["names"] == [model.names[i] for i in sorted(model.names)]
    for (k, a), (k2, b) in zip(model.state_dict().items(), converted.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    spec = ModelSpec(
        "ultralytics", str(tmp_path / "converted"), options={"score_threshold": 0.0, "imgsz": 320}
    )
    direct = ud.UltralyticsDetector(ModelSpec("ultralytics", "tiny:0", options={"score_threshold": 0.0}))
    a, b = ud.UltralyticsDetector(spec).detect([photo])[0], direct.detect([photo])[0]
    np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
    # Trusted explicitly, the pickled file loads through ultralytics' own loader to the same model.
    trusted = ModelSpec(
        "ultralytics", str(pickled), options={"trust_pickle": True, "score_threshold": 0.0, "imgsz": 320}
    )
    c = ud.UltralyticsDetector(trusted).detect([photo])[0]
    np.testing.assert_allclose(c.boxes, b.boxes, atol=1e-3)


def test_tiny_folders_load_with_the_hub_offline(tmp_path) -> None:
    """The saved tiny folders load in a fresh process with HF_HUB_OFFLINE=1 (nothing is fetched)."""
    code = (
        "from grand_pipeline.config import ModelSpec\n"
        "from grand_pipeline.models.roles import BACKENDS\n"
        "import grand_pipeline.models.backends\n"
        "for role, name in [('detector', 'owlv2'), ('tagger', 'clip_tagger'), ('depth', 'hf_depth')]:\n"
        "    b = BACKENDS[role].get(name)(ModelSpec(name, 'tiny:0'))\n"
        "    assert len(b.weights_id) == 64, b.weights_id\n"
        "print('ok')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRAND_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().endswith("ok")


def test_loading_ultralytics_leaves_pil_and_torch_unpatched() -> None:
    """Ultralytics swaps in its own PIL.Image.open (which tries to pip-install a HEIF plugin on an
    unreadable file) and torch.save; after our backend imports it, both are PIL's and torch's own,
    so a corrupt JPEG elsewhere in the actor is still a decode error row."""
    import io

    import PIL.Image
    import torch

    from grand_pipeline.models.backends import ultralytics_detector
    from grand_pipeline.sources.base import ImageDecodeError, decode_image

    before = PIL.Image.open, torch.save
    ultralytics_detector._tasks()
    assert (PIL.Image.open, torch.save) == before
    assert PIL.Image.open.__module__ == "PIL.Image" and torch.save.__module__ == "torch.serialization"
    with pytest.raises(ImageDecodeError):
        decode_image(b"not an image at all", max_pixels=10_000_000)
    with pytest.raises(PIL.UnidentifiedImageError):
        PIL.Image.open(io.BytesIO(b"still not an image"))
