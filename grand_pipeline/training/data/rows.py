"""Committed rows for the training wing: the highest committed level, read shard by shard.

GLaMM samples need level 3 (dense and grounded short captions); level 4 rows carry the same
columns plus extra context, so the highest committed level at or above 3 is read. Each shard is
read one record batch at a time, in shard order, so memory follows the batch, not the run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from grand_pipeline.run_meta import RunMeta
from grand_pipeline.store import Store, StoreError
from grand_pipeline.training.data.convert import ConvertOptions, convert_row
from grand_pipeline.training.data.samples import GCGSample
from grand_pipeline.units import split_unit_id

#: The first level whose rows hold grounded captions.
MIN_LEVEL = 3


class NotReadyError(StoreError):
    """The output has no committed level >= 3: a user error (one line, exit 2)."""


def training_level(store: Store) -> int:
    """The highest level >= ``MIN_LEVEL`` with a committed shard."""
    for level in sorted(store.levels_present(), reverse=True):
        if level >= MIN_LEVEL and store.committed(level):
            return level
    raise NotReadyError(
        f"no level {MIN_LEVEL} or higher is committed in {store.uri}: "
        f"run `grand run --levels 1-{MIN_LEVEL}` (or 1-4) first"
    )


def committed_shards(store: Store, level: int) -> list[str]:
    """The committed units of ``level`` (the unit of commit; each names its shard)."""
    return sorted(store.committed(level))


def unit_start(store: Store, unit: str) -> int:
    """Byte offset in its source tar where ``unit``'s images start (0 without a stored index), so
    reading a unit's pixels does not read the units before it."""
    shard, k = split_unit_id(unit)
    index = RunMeta(store).read_index(shard)
    return index.start_of(k) if index is not None else 0


def iter_shard_rows(
    store: Store, level: int, shard: str, columns: list[str] | None = None
) -> Iterator[dict[str, Any]]:
    """One shard's rows; ``columns`` reads only those (the converters need ``convert.ROW_COLUMNS``)."""
    for batch in store.read(level, shard, columns=columns).to_batches():
        yield from batch.to_pylist()


def iter_committed_rows(store: Store, level: int | None = None) -> Iterator[dict[str, Any]]:
    """Every row of every committed shard of ``level`` (default: ``training_level``)."""
    level = training_level(store) if level is None else level
    for shard in committed_shards(store, level):
        yield from iter_shard_rows(store, level, shard)


def iter_gcg_ground_truth(store: Store, opts: ConvertOptions, counts: Counter) -> Iterator[GCGSample]:
    """The GCG ground truth of a committed output: each ok row's dense-caption GCG sample, under
    the converters' filters (``opts``: ``ConvertOptions``). The evaluator's ``--gt OUTPUT`` and the
    ``gcg-oracle`` export both read this, so a perfect model scores exactly 1."""
    yield from gcg_ground_truth(iter_committed_rows(store), opts, counts)


def gcg_ground_truth(
    rows: Iterable[dict[str, Any]], opts: ConvertOptions, counts: Counter
) -> Iterator[GCGSample]:
    """The dense-caption GCG sample of each ok row of ``rows`` (``iter_gcg_ground_truth`` over
    rows already read, e.g. the export's stream)."""
    for row in rows:
        for sample in convert_row(row, opts, counts).gcg:
            if sample.source == "dense":
                yield sample
