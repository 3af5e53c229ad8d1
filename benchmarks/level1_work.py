"""Level-1 non-model work per image at SA-1B size, against a pycocotools floor.

``make bench`` prints one line from here (``python -m benchmarks.level1_work`` runs it alone):

    L1 non-model work per image, 2250x1500, 40 objects: ours 0.512 s, floor 0.301 s = 1.7x floor

*Ours* is every Level-1 stage (tags, detect, nms, vote, masks, attributes, depth) plus the row the
runner builds (``to_row`` and its Arrow table) on one SA-1B-sized image (1500 x 2250) with 40
objects, with each model replaced by a fixed output of the right shape: 48 SA-1B regions with real
RLE masks (rotated ellipses: 32 match an object, 8 are left over for floating attributes, 8 more
objects get the segmenter's mask), two detectors that box all 40 objects, a fixed depth map, and
a region captioner that makes its real crops (padded, greyed outside the mask) but no caption.
So the time is what Level 1 spends around its models: SA-1B mask decoding and matching, the vote,
RLE, crops, depth medians and row building.

The *floor* is the least any implementation must do with those masks: pycocotools decoding the
40 objects' RLEs and encoding 40 masks back, once each. Both sides run interleaved in this one
process after a warm-up, and the ratio is of their medians. Torch uses 2 threads.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pycocotools.mask as coco_mask
import torch
from PIL import Image
from skimage import data as skdata

from grand_pipeline.config import load_config
from grand_pipeline.models.roles import (
    DepthEstimator,
    Detections,
    Detector,
    Region,
    RegionCaptioner,
    Segmenter,
    Tag,
    Tagger,
)
from grand_pipeline.models.vision_common import region_crops
from grand_pipeline.schemas import LEVEL1_FIELDS
from grand_pipeline.stage import ImageRecord
from levels.level1 import STAGES, to_row

logger = logging.getLogger("benchmarks.level1_work")

HEIGHT, WIDTH = 1500, 2250
MATCHED, SEGMENTED, LEFTOVER = 32, 8, 8
OBJECTS = MATCHED + SEGMENTED
MEMBERS = ("rtdetr", "grounding_dino")
LABELS = ("cup", "table", "chair", "dog", "car", "tree", "lamp", "bottle")


# ----------------------------------------------------------------------------- the scene


def ellipse(rng: np.random.Generator, box: np.ndarray) -> np.ndarray:
    """(H, W) bool rotated ellipse inscribed (roughly) in the xyxy ``box``."""
    x1, y1, x2, y2 = box
    cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    angle = rng.uniform(-0.3, 0.3)
    top, bottom, left, right = int(y1), int(np.ceil(y2)), int(x1), int(np.ceil(x2))
    yy, xx = np.mgrid[top:bottom, left:right].astype(np.float32)
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    mask = np.zeros((HEIGHT, WIDTH), bool)
    mask[top:bottom, left:right] = (u / rx) ** 2 + (v / ry) ** 2 <= 0.95
    return mask


def random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    size = rng.uniform(80, 700, size=(n, 2))
    corner = rng.uniform(0, 1, size=(n, 2)) * (np.array([WIDTH, HEIGHT]) - size)
    return np.floor(np.concatenate([corner, corner + size], axis=1))


def tight_box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    return np.array([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], np.float32)


@dataclass
class Scene:
    image: np.ndarray
    regions: list[Region]
    object_boxes: np.ndarray  # (40, 4): matched regions' boxes, then the segmented objects'
    segmented_masks: np.ndarray  # (8, H, W) bool, what the segmenter returns for those 8
    depth: np.ndarray  # (H, W) float32


def make_scene(seed: int = 0) -> Scene:
    rng = np.random.default_rng(seed)
    photo = Image.fromarray(skdata.astronaut()).resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR)
    boxes = random_boxes(rng, MATCHED + LEFTOVER + SEGMENTED)
    masks = [ellipse(rng, b) for b in boxes]
    regions = []
    for mask in masks[: MATCHED + LEFTOVER]:
        encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        # SA-1B's JSON holds str counts; parse_regions keeps them as str.
        regions.append(
            Region(tight_box(mask), {"size": [HEIGHT, WIDTH], "counts": encoded["counts"].decode()})
        )
    object_boxes = np.concatenate([[r.bbox for r in regions[:MATCHED]], boxes[MATCHED + LEFTOVER :]])
    ramp = np.linspace(0.0, 1.0, HEIGHT, dtype=np.float32)[:, None] * np.ones((1, WIDTH), np.float32)
    depth = (ramp + 0.05 * rng.standard_normal((HEIGHT, WIDTH), dtype=np.float32)).astype(np.float32)
    return Scene(
        np.asarray(photo),
        regions,
        object_boxes.astype(np.float32),
        np.stack(masks[MATCHED + LEFTOVER :]),
        depth,
    )


# ----------------------------------------------------------------------------- fixed models


class FixedTagger(Tagger):
    role, backend = "tagger", "fixed_tagger"

    def tag(self, images: list[np.ndarray]) -> list[list[Tag]]:
        return [[Tag(name, 0.9 - 0.05 * i) for i, name in enumerate(LABELS)] for _ in images]


class FixedDetector(Detector):
    """The 40 object boxes, jittered by a member-specific 1%, with fixed scores and labels."""

    role, backend = "detector", "fixed_detector"

    def __init__(self, boxes: np.ndarray, seed: int) -> None:
        super().__init__(None)
        rng = np.random.default_rng(seed)
        wh = np.concatenate([boxes[:, 2:] - boxes[:, :2]] * 2, axis=1)
        self.boxes = (boxes + rng.uniform(-0.01, 0.01, boxes.shape) * wh).astype(np.float32)
        self.scores = rng.uniform(0.5, 0.95, len(boxes)).astype(np.float32)
        self.labels = [LABELS[i % len(LABELS)] for i in range(len(boxes))]

    def detect(self, images: list[np.ndarray], context: Any = None) -> list[Detections]:
        return [Detections(self.boxes, self.scores, list(self.labels), "fixed") for _ in images]


class FixedSegmenter(Segmenter):
    """The precomputed mask of the segmented object whose box centre is nearest each prompt."""

    role, backend = "segmenter", "fixed_segmenter"

    def __init__(self, boxes: np.ndarray, masks: np.ndarray) -> None:
        super().__init__(None)
        self.centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        self.masks = masks

    def _pick(self, boxes: np.ndarray) -> np.ndarray:
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        return np.linalg.norm(centres[:, None] - self.centres[None], axis=-1).argmin(axis=1)

    def segment(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        return self.masks[self._pick(np.asarray(boxes, np.float32))]


class CroppingCaptioner(RegionCaptioner):
    """``blip2_region``'s crops (padded, outside the mask greyed) without the BLIP-2 call."""

    role, backend = "region_captioner", "cropping_captioner"

    def __init__(self) -> None:
        super().__init__(None)
        self.crops = 0

    def describe_regions(self, image: np.ndarray, boxes: np.ndarray, masks: Any) -> list[str]:
        # What Blip2RegionCaptioner.describe_regions does before BLIP-2 (its device: the CPU here).
        crops = region_crops(image, boxes, masks, 0.1, torch.device("cpu"))
        self.crops += len([c.cpu().numpy() for c in crops])
        return ["a thing"] * len(crops)


class FixedDepth(DepthEstimator):
    role, backend = "depth", "fixed_depth"

    def __init__(self, depth: np.ndarray) -> None:
        super().__init__(None)
        self.map = depth

    def depth(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return [self.map for _ in images]


class Hub:
    def __init__(self, scene: Scene) -> None:
        self.backends: dict[str, Any] = {
            "tagger": FixedTagger(None),
            "segmenter": FixedSegmenter(scene.object_boxes[MATCHED:], scene.segmented_masks),
            "region_captioner": CroppingCaptioner(),
            "depth": FixedDepth(scene.depth),
        }
        for seed, member in enumerate(MEMBERS):
            self.backends[f"detectors.{member}"] = FixedDetector(scene.object_boxes, seed + 1)

    def get(self, key: str) -> Any:
        return self.backends[key]


# ----------------------------------------------------------------------------- the two sides


class Level1Work:
    """The Level-1 stages built once (as in an actor), run on a fresh record per call."""

    def __init__(self, scene: Scene) -> None:
        cfg = load_config("full")
        cfg.models.detectors = {m: cfg.models.detectors[m] for m in MEMBERS}
        self.scene = scene
        self.hub = Hub(scene)
        self.stages = [stage(cfg, self.hub) for stage in STAGES]
        self.schema = pa.schema(LEVEL1_FIELDS)

    def __call__(self) -> dict[str, Any]:
        record = ImageRecord(
            image_id="sa_1", shard_id="sa_000000", width=WIDTH, height=HEIGHT,
            image=self.scene.image, regions=list(self.scene.regions),
        )  # fmt: skip
        for stage in self.stages:
            stage([record])
        if not record.ok:
            raise RuntimeError(f"stage {record.error_stage} failed: {record.error}")
        row = to_row(record)
        pa.Table.from_pylist([row], schema=self.schema)
        return row


def object_masks(scene: Scene, row: dict[str, Any]) -> list[dict[str, Any]]:
    """The 40 objects' RLEs as the row stores them (the floor's input)."""
    return [o["segmentation"] for o in row["objects"] + row["floating_objects"]]


def floor(rles: list[dict[str, Any]]) -> list[bytes]:
    """pycocotools decodes each object's RLE once and encodes each dense mask once."""
    dense = coco_mask.decode(rles)  # (H, W, N) uint8, Fortran order: what encode wants
    return [r["counts"] for r in coco_mask.encode(dense)]


def check(scene: Scene, work: Level1Work, row: dict[str, Any]) -> None:
    objects = row["objects"] + row["floating_objects"]
    sources = [o["segmentation_source"] for o in objects]
    if len(objects) != OBJECTS or sources.count("sa1b") != MATCHED:
        raise AssertionError(f"scene broken: {len(objects)} objects, sources {sources}")
    if len(row["floating_attributes"]) != LEFTOVER:
        raise AssertionError(
            f"expected {LEFTOVER} floating attributes, got {len(row['floating_attributes'])}"
        )
    if any(o["depth"] is None for o in objects):
        raise AssertionError("an object has no depth")
    # The row's RLEs are exactly what pycocotools makes of the same masks.
    rles = object_masks(scene, row)
    expected = floor([{"size": r["size"], "counts": r["counts"].encode()} for r in rles])
    if [r["counts"].encode() for r in rles] != expected:
        raise AssertionError("the row's RLE strings differ from pycocotools'")


@dataclass
class Result:
    ours_s: float
    floor_s: float

    @property
    def ratio(self) -> float:
        return self.ours_s / self.floor_s

    def line(self) -> str:
        return (
            f"L1 non-model work per image, {WIDTH}x{HEIGHT}, {OBJECTS} objects "
            f"(stages + row, models fixed) vs floor (pycocotools decode + encode of each mask once): "
            f"ours {self.ours_s:.3f} s, floor {self.floor_s:.3f} s = {self.ratio:.1f}x floor"
        )


def run(repeats: int = 5) -> Result:
    """Median seconds of each side over ``repeats`` interleaved runs (floor, ours, ...)."""
    scene = make_scene()
    work = Level1Work(scene)
    row = work()  # warm-up: first-call costs (imports, allocator) are not per-image work
    check(scene, work, row)
    rles = [{"size": r["size"], "counts": r["counts"].encode()} for r in object_masks(scene, row)]
    floor(rles)
    times: dict[str, list[float]] = {"floor": [], "ours": []}
    for _ in range(repeats):
        for side, fn in (("floor", lambda: floor(rles)), ("ours", work)):
            start = time.perf_counter()
            fn()
            times[side].append(time.perf_counter() - start)
    logger.debug("level-1 work: %s", times)
    return Result(statistics.median(times["ours"]), statistics.median(times["floor"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("-v", "--verbose", action="store_true", help="log per-repeat timings")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    torch.set_num_threads(2)
    print(run(args.repeats).line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
