"""``grand retry-failed --level N``: recompute only the images that failed.

For every committed shard of level N with error rows, the error rows are recomputed; then, for
each later level committed for that shard, the rows of those same images are recomputed too
(their inputs changed). Every other row is kept as it was: the new table is the old one with
just those rows swapped in (an Arrow ``take``, no Python round trip), so untouched rows keep
their exact values. Each rewritten shard goes through :meth:`Store.commit` with ``replace``:
a fresh claim, the old marker removed, the new Parquet published, a new marker written last.
A kill in between leaves the shard uncommitted, and ``grand run`` recomputes it whole.

The work runs in-process (no Ray): failed images are few, and the runners load once per level.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from grand_pipeline.config import ConfigError, GrandConfig
from grand_pipeline.engine.runner import LevelRunner
from grand_pipeline.schemas import STATUS_ERROR
from grand_pipeline.sources import list_shards
from grand_pipeline.store import Store, StoreError

logger = logging.getLogger(__name__)

#: Marker fields carried over from the original commit: the retry does not redo the shard.
_KEPT = ("seconds", "stage_seconds", "started", "finished", "host", "models", "config_hash")


@dataclass
class RetrySummary:
    attempt: int = 0
    #: level -> shard -> image ids recomputed there
    recomputed: dict[int, dict[str, list[str]]] = field(default_factory=dict)
    #: level -> images that are ok now among those recomputed at the retried level
    fixed: int = 0
    still_failed: int = 0


def failed_ids(table: pa.Table) -> list[str]:
    return pc.filter(table.column("image_id"), pc.equal(table.column("status"), STATUS_ERROR)).to_pylist()


def splice(old: pa.Table, new_rows: pa.Table) -> pa.Table:
    """``old`` with the rows of ``new_rows`` (matched by image_id) in their places."""
    position = {image_id: i for i, image_id in enumerate(new_rows.column("image_id").to_pylist())}
    offset = old.num_rows
    indices = [
        offset + position[image_id] if image_id in position else i
        for i, image_id in enumerate(old.column("image_id").to_pylist())
    ]
    missing = set(position) - set(old.column("image_id").to_pylist())
    if missing:
        raise StoreError(f"recomputed rows for images not in the shard: {sorted(missing)[:5]}")
    combined = pa.concat_tables([old, new_rows.cast(old.schema)]).combine_chunks()
    return combined.take(pa.array(indices, pa.int64()))


def retry_failed(
    cfg: GrandConfig,
    output_uri: str,
    level: int,
    input_uri: str | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> RetrySummary:
    emit = on_event or (lambda event: None)
    store = Store(output_uri)
    meta = store.read_run_meta() or {}
    if meta.get("config_hash") and meta["config_hash"] != cfg.content_hash():
        raise ConfigError(
            f"config hash {cfg.content_hash()} differs from the run's {meta['config_hash']}: "
            "retry with the run's --profile/--config/--set, or the rows would mix configs"
        )
    source = input_uri or meta.get("input")
    if not source:
        raise ConfigError("the run records no input; pass --input")
    refs = {ref.shard_id: ref for ref in list_shards(source)}
    later = [lv for lv in store.levels_present() if lv > level]
    summary = RetrySummary()
    todo = {}
    for shard in sorted(store.committed(level)):
        ids = failed_ids(store.read(level, shard, columns=["image_id", "status"]))
        if ids:
            if shard not in refs:
                raise StoreError(f"shard {shard} is not in the input {source}")
            todo[shard] = ids
    emit({"type": "plan", "shards": len(todo), "images": sum(map(len, todo.values()))})
    if not todo:
        return summary
    summary.attempt = store.next_attempt()
    runners: dict[int, LevelRunner] = {}
    for shard, ids in todo.items():
        for lv in [level, *later]:
            if lv != level and shard not in store.committed(lv):
                break  # the next `grand run` computes it, from the new level below
            runner = runners.get(lv) or runners.setdefault(lv, LevelRunner(cfg, lv))
            started = time.perf_counter()
            new_rows, _ = runner.run_shard(refs[shard], output_uri, only=set(ids))
            old = store.read(lv, shard)
            table = splice(old, new_rows)
            marker = store.marker(lv, shard) or {}
            stats = {k: marker[k] for k in _KEPT if k in marker}
            stats.update(
                retried_images=len(ids),
                retry_seconds=round(time.perf_counter() - started, 3),
                retry_attempt=summary.attempt,
                retried_at=time.time(),
            )
            if not store.commit(lv, shard, table, stats, summary.attempt, replace=True):
                raise StoreError(f"level {lv} shard {shard}: another attempt holds the commit; rerun later")
            summary.recomputed.setdefault(lv, {})[shard] = list(ids)
            if lv == level:
                fixed = len(ids) - len(failed_ids(new_rows))
                summary.fixed += fixed
                summary.still_failed += len(ids) - fixed
            emit({"type": "retried", "level": lv, "shard": shard, "images": len(ids)})
            logger.info("level %d shard %s: %d image(s) recomputed", lv, shard, len(ids))
    return summary
