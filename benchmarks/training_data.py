"""Training-data throughput on a committed output, against the mask-decoding floor, in one run.

``make bench`` runs this on the demo output (``python -m benchmarks.training_data --output
demo_out/out``). Three things are timed, interleaved over the same rows, medians of the repeats:

1. **floor**: decode every mask of every ok row once with pycocotools. Any loader must at least
   turn the RLE targets into pixels, so this is the least work a GLaMM batch can cost.
2. **converters**: ``convert_row`` over the same rows (already in memory), every task's samples.
3. **dataset**: ``GrandGlammDataset`` end to end at the full-size preprocessing (CLIP 336, SAM 1024,
   576 image tokens): Parquet read, conversion, one pass over the source tar with JPEG decoding,
   both image transforms, tokenisation and the chosen sample's masks. Its tokenizer is the offline
   word-level one with GLaMM's special tokens (Vicuna's is not available offline).

The ratio ``dataset / floor`` is the issue's target (at most 3x): the loader then costs about as
much as its unavoidable mask work, and a worker or two keeps a GPU fed.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pycocotools.mask as coco_mask
import torch

from grand_pipeline.models.hf_common import tiny_tokenizer
from grand_pipeline.schemas import STATUS_OK
from grand_pipeline.store import Store
from grand_pipeline.training.data.convert import ConvertOptions, convert_row
from grand_pipeline.training.data.dataset import DataConfig, GrandGlammDataset
from grand_pipeline.training.data.rows import iter_committed_rows
from grand_pipeline.training.data.tokens import SPECIAL_TOKENS

logger = logging.getLogger("benchmarks.training_data")

TARGET_RATIO = 3.0


def row_masks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every object and floating-object mask of the ok rows, as pycocotools wants them (bytes)."""
    out = []
    for row in rows:
        if row.get("status") != STATUS_OK:
            continue
        for key in ("objects", "floating_objects"):
            for obj in row.get(key) or []:
                seg = obj.get("segmentation")
                if seg:
                    out.append({"size": list(seg["size"]), "counts": seg["counts"].encode()})
    return out


def floor(masks: list[dict[str, Any]]) -> int:
    return sum(int(coco_mask.decode(m).any()) for m in masks)


def converters(rows: list[dict[str, Any]]) -> int:
    counts: Counter = Counter()
    return sum(len(convert_row(row, ConvertOptions(), counts)) for row in rows)


def dataset_pass(dataset: GrandGlammDataset) -> int:
    """One epoch of items (the dataset and its tokenizer are built once, outside the timing)."""
    return sum(1 for _ in dataset)


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    start = time.perf_counter()
    n = fn()
    return time.perf_counter() - start, n


def run(output: str, repeats: int = 3) -> list[str]:
    """The table's lines; each side is warmed once, then the three run interleaved ``repeats`` times."""
    rows = list(iter_committed_rows(Store(output)))
    masks = row_masks(rows)
    tokenizer = tiny_tokenizer(extra_special=SPECIAL_TOKENS)
    dataset = GrandGlammDataset(output, tokenizer, DataConfig(), rank=0, world_size=1)
    sides: dict[str, Callable[[], int]] = {
        "floor: pycocotools decode of each row's masks once": lambda: floor(masks),
        "converters (convert_row, all tasks)": lambda: converters(rows),
        "dataset (pixels, CLIP 336 + SAM 1024, tokens, masks)": lambda: dataset_pass(dataset),
    }
    for fn in sides.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    units: dict[str, int] = {}
    for _ in range(repeats):
        for name, fn in sides.items():
            seconds, n = timed(fn)
            times[name].append(seconds)
            units[name] = n
    med = {name: statistics.median(t) for name, t in times.items()}
    names = list(sides)
    width = max(map(len, names))
    lines = [
        f"training data on {output}: {len(rows)} rows, {len(masks)} masks",
        f"{'case':<{width}} | units | seconds  | units/s",
        "-" * (width + 34),
    ]
    for name in names:
        lines.append(f"{name:<{width}} | {units[name]:5d} | {med[name]:8.4f} | {units[name] / med[name]:9.1f}")
    ratio = med[names[2]] / med[names[0]]
    verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
    lines.append(f"dataset / floor: {ratio:.2f}x (target <= {TARGET_RATIO:g}x: {verdict})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="demo_out/out", help="a committed output (make demo)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    print("\n".join(run(args.output, args.repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
