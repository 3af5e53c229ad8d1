"""Training-loop throughput on the tiny config: with the data loader vs on pre-loaded batches.

``make bench`` runs this on the demo output (``python -m benchmarks.training_loop --output
demo_out/out``). One :class:`~grand_pipeline.training.train.loop.Trainer` (tiny GLaMM, CPU) runs
the same number of optimiser steps two ways, interleaved ``repeats`` times, medians reported:

1. **loader**: each micro-batch comes from the Dataset as the loop asks for it (Parquet rows,
   conversion, one pass over the source tar, JPEG decoding, transforms, tokens, masks, collate).
2. **pre-loaded**: the same number of micro-batches, taken from the same stream *before* the
   clock starts, so only forward, backward and the optimiser are timed.

The ratio ``loader / pre-loaded`` (samples/s) is the share of the model's speed the loader lets
through: 1.0 means data loading is free; lower means the loop waits for data and more loader
workers (``--set data.loader_workers=N``) are worth their cores. Checkpoints and the log go to a
temporary folder, never into the output.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from grand_pipeline.training.config import load_train_config
from grand_pipeline.training.train.loop import Trainer, WorkerContext

logger = logging.getLogger("benchmarks.training_loop")


def timed_steps(trainer: Trainer, steps: int, batches: Callable[[], dict[str, Any]] | None) -> float:
    """Seconds for ``steps`` optimiser steps; ``batches`` None means the live data stream."""
    start = time.perf_counter()
    for i in range(steps):
        trainer.step(i + 1, batches)
    return time.perf_counter() - start


def run(output: str, steps: int, repeats: int, overrides: list[str]) -> list[str]:
    """The table's lines (one warm-up step first, then the two sides interleaved)."""
    cfg = load_train_config("tiny", overrides, steps=10**6)  # a long schedule: lr stays non-zero
    with tempfile.TemporaryDirectory(prefix="grand-bench-train-") as workdir:
        trainer = Trainer(cfg, output, WorkerContext(), workdir=workdir)
        per_step = trainer.samples_per_step
        timed_steps(trainer, 1, None)
        times: dict[str, list[float]] = {"loader": [], "pre-loaded": []}
        for _ in range(repeats):
            times["loader"].append(timed_steps(trainer, steps, None))
            preloaded = iter(trainer.stream.preload(steps * cfg.optim.grad_accum))
            times["pre-loaded"].append(timed_steps(trainer, steps, preloaded.__next__))
    rate = {name: steps * per_step / statistics.median(t) for name, t in times.items()}
    lines = [
        f"tiny GLaMM training loop on {output}: {steps} steps x {per_step} samples, "
        f"median of {repeats}, {torch.get_num_threads()} torch thread(s), "
        f"{cfg.data.loader_workers} loader worker(s)",
        f"{'case':<28} | samples/s | steps/s",
        "-" * 52,
    ]
    for name, value in rate.items():
        label = "with the data loader" if name == "loader" else "on pre-loaded batches"
        lines.append(f"{label:<28} | {value:9.2f} | {value / per_step:7.2f}")
    lines.append(f"loader / pre-loaded: {rate['loader'] / rate['pre-loaded']:.2f}x of the model's speed")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="demo_out/out", help="a committed output with level 3+ (make demo)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="dotted.key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print("\n".join(run(args.output, args.steps, args.repeats, args.overrides)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
