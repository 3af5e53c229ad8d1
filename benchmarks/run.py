"""Side-by-side speed ratios of the pipeline's hot paths against their naive baselines.

Run with ``make bench`` (``python -m benchmarks.run``; ``-v`` logs every repeat). Each pair runs
in this one process on the same inputs, interleaved (baseline, ours, baseline, ours, ...) after
untimed warm-up, so machine noise hits both sides alike; the table shows the median of each side
and their ratio. Both sides' outputs are checked to agree. Torch uses 2 threads.

Why each baseline is the fair comparison:

1. NMS: the textbook greedy loop in plain Python (visit by descending score, keep a box unless
   a kept box overlaps it by IoU > threshold), i.e. the same rule as ``geometry.boxes.nms`` and
   the same kept indices; only the vectorisation differs.
2. RLE encode and decode: ``pycocotools.mask`` itself on the same 40 SA-1B-sized masks (1500 x
   2250, real RLEs; ``level1_work``'s scene), since ``geometry.rle`` keeps a hand-written codec
   only where it beats the library: encode starts from (N, H, W) masks as the segmenters give
   them, so pycocotools pays for the Fortran-order copy it needs. Strings and masks are checked
   equal. A third line decodes into tight-box crops (``geometry.boxed``), what Level 1 keeps.
3. Segmenter: the same LiteMedSAM weights and code path, called once per box (one image
   embedding per box) against one call with all 16 boxes (one embedding, one decoder batch).
   This is what a stage that loops over objects would pay.
4. Tagger: the same EfficientNet-Lite0 call with one image per call against one call with 8
   images (the profile's ``batch_size``); same tags either way.
5. Decode once: ``decode_image`` on the same JPEG once per stage (7 stages; the reference
   decodes each image ~15 times) against decoding once and handing the array to every stage.
   The stages' own work is left out, so the ratio is what sharing saves per image.

After the table, ``benchmarks/level1_work.py`` prints the ``L1 non-model`` line: all of Level 1's
work around its models for one SA-1B-sized image, as a multiple of the pycocotools floor.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pycocotools.mask as coco_mask
import torch
from PIL import Image
from skimage import data as skdata

from grand_pipeline.config import load_config
from grand_pipeline.geometry import boxed, rle
from grand_pipeline.geometry import boxes as box_ops
from grand_pipeline.models.hub import ModelHub
from grand_pipeline.models.roles import Segmenter, Tagger
from grand_pipeline.sources.base import decode_image

logger = logging.getLogger("benchmarks.run")

NUM_THREADS = 2
STAGES = 7
MAX_PIXELS = 60_000_000


@dataclass
class Row:
    case: str
    baseline_s: float
    ours_s: float

    @property
    def speedup(self) -> float:
        return self.baseline_s / self.ours_s


def compare(
    name: str,
    baseline_fn: Callable[[], Any],
    ours_fn: Callable[[], Any],
    repeats: int,
    check: Callable[[Any, Any], None],
    warm_baseline: bool = True,
) -> Row:
    """Median wall time of each side over ``repeats`` interleaved runs (baseline, ours, ...).

    Untimed warm-up calls come first (the baseline's may be skipped when it is slow and runs
    the same code as ours); ``check(baseline_out, ours_out)`` gets the first timed outputs and
    raises when the two sides disagree.
    """
    if warm_baseline:
        baseline_fn()
    ours_fn()
    times: dict[str, list[float]] = {"baseline": [], "ours": []}
    first: dict[str, Any] = {}
    for _ in range(repeats):
        for side, fn in (("baseline", baseline_fn), ("ours", ours_fn)):
            start = time.perf_counter()
            out = fn()
            times[side].append(time.perf_counter() - start)
            first.setdefault(side, out)
    check(first["baseline"], first["ours"])
    logger.debug("%s: %s", name, times)
    return Row(name, statistics.median(times["baseline"]), statistics.median(times["ours"]))


# ----------------------------------------------------------------------------- naive baselines


def naive_nms(boxes: list[list[float]], scores: list[float], iou_threshold: float) -> list[int]:
    """Greedy NMS, one Python IoU per (candidate, kept box) pair."""
    keep: list[int] = []
    for i in sorted(range(len(scores)), key=lambda j: -scores[j]):  # stable: ties lower index first
        ax1, ay1, ax2, ay2 = boxes[i]
        area_a = max(ax2 - ax1, 0.0) * max(ay2 - ay1, 0.0)
        for k in keep:
            bx1, by1, bx2, by2 = boxes[k]
            inter = max(min(ax2, bx2) - max(ax1, bx1), 0.0) * max(min(ay2, by2) - max(ay1, by1), 0.0)
            union = area_a + max(bx2 - bx1, 0.0) * max(by2 - by1, 0.0) - inter
            if union > 0 and inter / union > iou_threshold:
                break
        else:
            keep.append(i)
    return keep


# ----------------------------------------------------------------------------- cases


def bench_nms(repeats: int) -> Row:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1000, size=(2000, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 150, size=(2000, 2))], axis=1)
    scores = rng.uniform(0, 1, size=2000)
    box_list, score_list = boxes.tolist(), scores.tolist()

    def same(naive: list[int], ours: np.ndarray) -> None:
        assert ours.tolist() == naive, "NMS kept different boxes"
        logger.debug("nms keeps %d of 2000 boxes", len(naive))

    return compare(
        "NMS, 2000 boxes (Python loop)",
        lambda: naive_nms(box_list, score_list, 0.5),
        lambda: box_ops.nms(boxes, scores, 0.5),
        repeats,
        same,
    )


def sa1b_masks() -> tuple[list[dict[str, Any]], np.ndarray]:
    """40 SA-1B-sized RLEs (str counts) and the same masks dense, (40, H, W) bool."""
    from benchmarks.level1_work import make_scene

    rles = [r.rle for r in make_scene().regions[:40]]
    return rles, rle.decode(rles)


def coco_rles(rles: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"size": r["size"], "counts": r["counts"].encode()} for r in rles]


def bench_rle_encode(repeats: int) -> Row:
    rles, masks = sa1b_masks()

    def same(coco: list[dict[str, Any]], ours: list[dict[str, Any]]) -> None:
        assert (
            [r["counts"].decode() for r in coco] == [r["counts"] for r in ours] == [r["counts"] for r in rles]
        )

    return compare(
        "RLE encode, 40 masks 2250x1500 (pycocotools)",
        lambda: coco_mask.encode(np.asfortranarray(masks.transpose(1, 2, 0)).view(np.uint8)),
        lambda: rle.encode(masks),
        repeats,
        same,
    )


def bench_rle_decode(repeats: int) -> Row:
    rles, _ = sa1b_masks()
    coco = coco_rles(rles)

    def same(theirs: np.ndarray, ours: np.ndarray) -> None:
        assert np.array_equal(theirs.transpose(2, 0, 1), ours), "decoded masks differ"

    return compare(
        "RLE decode, 40 masks 2250x1500 (pycocotools)",
        lambda: coco_mask.decode(coco),
        lambda: rle.decode(rles),
        repeats,
        same,
    )


def bench_rle_decode_boxed(repeats: int) -> Row:
    rles, _ = sa1b_masks()
    coco = coco_rles(rles)

    def same(theirs: np.ndarray, ours: boxed.BoxedMasks) -> None:
        assert np.array_equal(theirs.transpose(2, 0, 1), np.asarray(ours)), "decoded masks differ"

    return compare(
        "RLE decode to tight boxes, 40 masks (pycocotools dense)",
        lambda: coco_mask.decode(coco),
        lambda: boxed.decode(rles),
        repeats,
        same,
    )


def bench_segmenter(hub: ModelHub, repeats: int) -> Row:
    seg = cast(Segmenter, hub.get("segmenter"))
    image = skdata.astronaut()
    rng = np.random.default_rng(1)
    corner = rng.uniform(0, 350, size=(16, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(60, 160, size=(16, 2))], axis=1)

    def same(single: list[np.ndarray], batched: np.ndarray) -> None:
        agreement = float((np.concatenate(single) == batched).mean())
        assert agreement > 0.999, f"batched and per-box masks agree on only {agreement:.4%} of pixels"

    return compare(
        "segmenter, astronaut, 16 boxes (16 calls)",
        lambda: [seg.segment(image, b[None]) for b in boxes],
        lambda: seg.segment(image, boxes),
        repeats,
        same,
        # 16 encoder passes per baseline call; ours' warm-up already ran the same encoder and
        # the median absorbs a cold first call.
        warm_baseline=False,
    )


def bench_tagger(hub: ModelHub, repeats: int) -> Row:
    tagger = cast(Tagger, hub.get("tagger"))
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    photos += [skdata.stereo_motorcycle()[0], skdata.hubble_deep_field()]
    images = photos + photos[:2]  # 8 images: the profile's batch_size

    def same(single: list[list[list[Any]]], batched: list[list[Any]]) -> None:
        assert [t[0][0].name for t in single] == [t[0].name for t in batched], "top tags differ"

    return compare(
        "tagger, 8 photos (8 calls of 1)",
        lambda: [tagger.tag([im]) for im in images],
        lambda: tagger.tag(images),
        repeats,
        same,
    )


def bench_decode(repeats: int) -> Row:
    buf = io.BytesIO()
    Image.fromarray(skdata.astronaut()).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()

    def shared() -> list[np.ndarray]:
        image = decode_image(jpeg, MAX_PIXELS)
        return [image for _ in range(STAGES)]

    def same(per_stage: list[np.ndarray], ours: list[np.ndarray]) -> None:
        assert all(np.array_equal(a, b) for a, b in zip(per_stage, ours, strict=True)), "decodes differ"

    return compare(
        f"decode JPEG 512x512, {STAGES} stages (decode per stage)",
        lambda: [decode_image(jpeg, MAX_PIXELS) for _ in range(STAGES)],
        shared,
        repeats,
        same,
    )


# ----------------------------------------------------------------------------- CLI


def machine() -> str:
    return (
        f"machine: {platform.machine()} {platform.system()}, cpus {os.cpu_count()}, "
        f"torch threads {torch.get_num_threads()}, python {platform.python_version()}, "
        f"torch {torch.__version__}, numpy {np.__version__}"
    )


def table(rows: list[Row]) -> str:
    width = max(len(r.case) for r in rows)
    lines = [f"{'case':<{width}} | baseline s | ours s   | speed-up", "-" * (width + 35)]
    for r in rows:
        lines.append(f"{r.case:<{width}} | {r.baseline_s:10.4f} | {r.ours_s:8.4f} | {r.speedup:7.1f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log per-repeat timings")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    torch.set_num_threads(NUM_THREADS)
    print(machine(), flush=True)
    hub = ModelHub(load_config("lite").models)
    rows = [
        bench_nms(repeats=5),
        bench_rle_encode(repeats=5),
        bench_rle_decode(repeats=5),
        bench_rle_decode_boxed(repeats=5),
        bench_segmenter(hub, repeats=2),
        bench_tagger(hub, repeats=3),
        bench_decode(repeats=15),
    ]
    # The lite LLM: the same 16 prompts batched vs one at a time (benchmarks/llm_batching.py).
    from benchmarks import llm_batching

    rows += [Row(case, base, ours) for case, base, ours in llm_batching.run()]
    print(f"median of interleaved repeats, same inputs, one process\n\n{table(rows)}")
    from benchmarks import level1_work

    print(f"\n{level1_work.run(repeats=5).line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
