"""A rank's micro-batches, epoch after epoch, with a cursor that makes resuming exact.

The Dataset is deterministic given (seed, epoch, rank, loader workers), so a rank's item sequence
is fixed; the :class:`~.checkpoint.Cursor` (epoch, items taken from it) names a point in it. On
resume the stream replays the epoch and drops the items already consumed, then goes on: the
batches after a resume equal those of an uninterrupted run. Items are batched here, not by the
DataLoader, so the cursor counts items exactly whatever the batch size, and a micro-batch may
straddle two epochs.

The DataLoader gets its own seeded generator: creating its iterator would otherwise draw from the
global torch RNG at every epoch start, and the resumed run starts its epoch at another moment.

**Prefetch.** With ``prefetch > 0`` one background thread walks the same item sequence into a
bounded queue while the model computes: decoding, resizing, Parquet and tar reads run in C with
the GIL released, so on a spare core the loop stops waiting for data. Items still come out in the
same order, each with its cursor position, so resuming is unchanged. The data path draws only
from its own seeded generators, never the global RNG, so the thread cannot perturb training.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from grand_pipeline.config import ConfigError
from grand_pipeline.engine.prefetch import prefetched
from grand_pipeline.training.data.dataset import GrandGlammDataset, TrainItem

from .checkpoint import Cursor

logger = logging.getLogger(__name__)


class NoTrainingItems(ConfigError):
    """A rank's shards gave no item in a whole epoch: training could never make a step."""


def _single(item: Any) -> Any:
    """The DataLoader's ``collate_fn`` for single items (module level: workers pickle it)."""
    return item


class BatchStream:
    """Endless micro-batches of ``batch_size`` items from ``dataset``, starting at ``cursor``."""

    def __init__(
        self,
        dataset: GrandGlammDataset,
        collate: Callable[[list[TrainItem]], dict[str, Any]],
        batch_size: int,
        *,
        loader_workers: int = 0,
        seed: int = 0,
        cursor: Cursor = Cursor(),
        prefetch: int = 0,
    ) -> None:
        self.dataset = dataset
        self.collate = collate
        self.batch_size = batch_size
        self.loader_workers = loader_workers
        self.seed = seed
        self.epoch, self.items = cursor.epoch, cursor.items
        self._loader: DataLoader | None = None
        self._feed: Generator[tuple[int, int, TrainItem], None, None] | None = None
        self._items = self._iterate(cursor) if prefetch <= 0 else self._prefetched(cursor, prefetch)

    @property
    def cursor(self) -> Cursor:
        """The position after the last item handed out."""
        return Cursor(self.epoch, self.items)

    def _epoch(self, epoch: int) -> Iterator[TrainItem]:
        self.dataset.set_epoch(epoch)  # shared memory: persistent workers read it at each pass
        if self._loader is None:
            # One loader for the run: its workers persist across epochs instead of being forked
            # and re-initialised at every epoch start (a small output has epochs of a few items).
            self._loader = DataLoader(
                self.dataset,
                batch_size=None,
                collate_fn=_single,
                num_workers=self.loader_workers,
                persistent_workers=self.loader_workers > 0,
                generator=torch.Generator().manual_seed(self.seed),
            )
        yield from self._loader

    def _positions(self, start: Cursor) -> Iterator[tuple[int, int, TrainItem]]:
        """``(epoch, items taken from it, item)`` from ``start`` on, endlessly."""
        epoch, skip = start.epoch, start.items
        while True:
            seen = 0
            for item in self._epoch(epoch):
                seen += 1
                if seen > skip:
                    yield epoch, seen, item
            if seen == 0:
                raise NoTrainingItems(
                    f"epoch {epoch}: this rank's shards {self.dataset.shards()} gave no training item "
                    f"(counts {dict(self.dataset.counts)}); check the output or use fewer workers"
                )
            if seen < skip:
                logger.warning("epoch %d has %d items, the checkpoint had consumed %d", epoch, seen, skip)
            epoch, skip = epoch + 1, 0

    def _iterate(self, start: Cursor) -> Iterator[TrainItem]:
        for epoch, seen, item in self._positions(start):
            self.epoch, self.items = epoch, seen
            yield item

    def _prefetched(self, start: Cursor, depth: int) -> Iterator[TrainItem]:
        """:meth:`_iterate`, produced by the pipeline's read-ahead thread up to ``depth`` items ahead."""
        feed = self._feed = prefetched(self._positions(start), depth)
        for epoch, seen, item in feed:
            self.epoch, self.items = epoch, seen
            yield item

    def close(self) -> None:
        """Stop the prefetch thread (it finishes the item in hand, then ends); idempotent."""
        if self._feed is not None:
            self._feed.close()  # sets its stop flag and joins its thread
            self._feed = None

    def next_batch(self) -> dict[str, Any]:
        """The next micro-batch (collated); advances the cursor by ``batch_size`` items."""
        return self.collate([next(self._items) for _ in range(self.batch_size)])

    def preload(self, count: int) -> list[dict[str, Any]]:
        """``count`` micro-batches in memory (the benchmark's loader-free side)."""
        return [self.next_batch() for _ in range(count)]
