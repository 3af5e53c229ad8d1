"""Peak memory of a Level 1-3 run against shard size: it must follow the micro-batch, not the shard.

Two SA-1B-format shards are written (2250x1500 JPEGs, 40 rectangle masks each, COCO RLE from
pycocotools), one of ``--small`` and one of ``--large`` images; ``grand run --levels 1-3
--profile tiny-lite --executor local`` runs over each while a sampler records the RSS of the whole
process tree every 50 ms. The line printed is::

    stream memory (L1-3, tiny-lite, 2250x1500, 40 masks): 100 images 812 MB, 400 images 845 MB,
    delta 33 MB (target <= 150 MB: met)

Both runs use the same config (``engine.unit_images`` included, default 500, so both shards are one
unit each by default): what is measured is streaming inside a unit, not the unit split.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image
from pycocotools import mask as mask_utils

from grand_pipeline.sources import write_sa1b_tar

WIDTH, HEIGHT, MASKS = 2250, 1500, 40
TARGET_MB = 150.0


def _image(rng: np.random.Generator) -> bytes:
    # Smooth gradients plus mild noise: JPEG sizes near SA-1B's (a few hundred KB), quickly made.
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = np.stack([(x * rng.uniform(0.05, 0.12)) % 255, (y * rng.uniform(0.05, 0.12)) % 255,
                     ((x + y) * rng.uniform(0.02, 0.06)) % 255], axis=-1)
    noise = rng.integers(0, 24, size=(HEIGHT // 4, WIDTH // 2, 3)).repeat(4, 0).repeat(2, 1)
    buf = io.BytesIO()
    Image.fromarray((base + noise).clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _annotations(rng: np.random.Generator) -> list[dict]:
    anns = []
    for k in range(MASKS):
        w, h = int(rng.integers(40, 600)), int(rng.integers(40, 500))
        x0, y0 = int(rng.integers(0, WIDTH - w)), int(rng.integers(0, HEIGHT - h))
        m = np.zeros((HEIGHT, WIDTH), np.uint8, order="F")
        m[y0 : y0 + h, x0 : x0 + w] = 1
        rle = mask_utils.encode(m)
        anns.append({"id": k, "segmentation": {"size": [HEIGHT, WIDTH], "counts": rle["counts"].decode()},
                     "bbox": [x0, y0, w, h], "area": w * h, "predicted_iou": 0.9, "stability_score": 0.95})
    return anns


def write_shard(path: Path, images: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    # A few distinct photos reused: writing hundreds of 3-MP JPEGs would dominate the benchmark.
    photos = [_image(rng) for _ in range(8)]
    items = [(f"sa_{i}", photos[i % len(photos)],
              {"image": {"image_id": i, "width": WIDTH, "height": HEIGHT, "file_name": f"sa_{i}.jpg"},
               "annotations": _annotations(rng)}) for i in range(images)]
    write_sa1b_tar(str(path), items)


def peak_rss_mb(cmd: list[str]) -> float:
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                tree = [proc, *proc.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, err = proc.communicate()
    stop.set()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}): {err.decode()[-1500:]}")
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--large", type=int, default=400)
    parser.add_argument("--levels", default="1-3")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (args.small, args.large):
            shard = Path(tmp) / f"in{n}" / "sa_000000.tar"
            shard.parent.mkdir()
            write_shard(shard, n)
            cmd = [sys.executable, "-m", "grand_pipeline.cli", "run", "-i", str(shard), "-o", f"{tmp}/out{n}",
                   "--levels", args.levels, "--profile", "tiny-lite", "--executor", "local"]
            for item in args.overrides:
                cmd += ["--set", item]
            peaks[n] = peak_rss_mb(cmd)
    delta = peaks[args.large] - peaks[args.small]
    verdict = "met" if delta <= TARGET_MB else "MISSED"
    print(f"stream memory (L{args.levels}, tiny-lite, {WIDTH}x{HEIGHT}, {MASKS} masks): {args.small} images "
          f"{peaks[args.small]:.0f} MB, {args.large} images {peaks[args.large]:.0f} MB, delta {delta:.0f} MB "
          f"(target <= {TARGET_MB:.0f} MB: {verdict})")


if __name__ == "__main__":
    main()
