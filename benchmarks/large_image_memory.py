"""Peak memory and time of Level 1 (tiny-lite) on one large synthetic JPEG.

Not a test: it writes ``<root>/in/<side>.jpg`` (a smooth colour field with a few dozen
rectangles, so the detectors have something to box), runs ``grand run --levels 1 --profile
tiny-lite --executor local`` on it under ``/usr/bin/time -v`` and prints one line:

    level1 tiny-lite 4000x4000 (16.0 MP): max RSS 1234 MB, 56.7 s, 12 segmented masks, status ok

    python -m benchmarks.large_image_memory --side 4000 [--side 7700] [--code /tmp/old-checkout]
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

logger = logging.getLogger("benchmarks.large_image_memory")


def synthetic_jpeg(path: Path, side: int, seed: int = 0) -> None:
    """A side x side JPEG: colour gradients plus 40 random filled rectangles."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    image = np.empty((side, side, 3), np.uint8)
    image[..., 0] = ramp[None, :].astype(np.uint8)
    image[..., 1] = ramp[:, None].astype(np.uint8)
    image[..., 2] = 128
    for _ in range(40):
        x, y = rng.integers(0, side * 3 // 4, 2)
        w, h = rng.integers(side // 20, side // 4, 2)
        image[y : y + h, x : x + w] = rng.integers(0, 255, 3, dtype=np.uint8)
    Image.fromarray(image).save(path, quality=90)


def run_once(root: Path, side: int, code: Path) -> str:
    inp, out = root / f"in{side}", root / f"out{side}"
    shutil.rmtree(out, ignore_errors=True)
    inp.mkdir(parents=True, exist_ok=True)
    image = inp / f"big{side}.jpg"
    if not image.exists():
        synthetic_jpeg(image, side)
    # Run from ``code`` so a checkout of another commit can be measured with this interpreter.
    cli = "from grand_pipeline.cli import app; app()"
    cmd = [
        "/usr/bin/time",
        "-v",
        sys.executable,
        "-c",
        cli,
        "run",
        "-i",
        str(inp),
        "-o",
        str(out),
        "--levels",
        "1",
        "--profile",
        "tiny-lite",
        "--executor",
        "local",
    ]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=code)
    seconds = time.perf_counter() - start
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    rss_mb = int(found.group(1)) / 1024 if found else float("nan")
    status, segmented = "missing", 0
    tables = sorted((out / "level1").glob("*.parquet"))
    if tables:
        row = pq.read_table(tables[0]).to_pylist()[0]
        status = f"{row.get('status')} {row.get('error') or ''}".strip()
        objects = (row.get("objects") or []) + (row.get("floating_objects") or [])
        segmented = sum(1 for o in objects if str(o.get("segmentation_source", "")).startswith("segmenter"))
    elif done.returncode:
        status = f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"
    mp = side * side / 1e6
    return (
        f"level1 tiny-lite {side}x{side} ({mp:.1f} MP): max RSS {rss_mb:.0f} MB, {seconds:.1f} s, "
        f"{segmented} segmented masks, status {status}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, action="append", help="square image side in px (repeatable)")
    parser.add_argument("--root", type=Path, default=Path("/tmp/large_image_memory"))
    parser.add_argument(
        "--code",
        type=Path,
        default=Path(__file__).resolve().parents[1],
        help="source tree to run (default: this checkout)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for side in args.side or [4000]:
        logger.info("%s", run_once(args.root.resolve(), side, args.code.resolve()))


if __name__ == "__main__":
    main()
