"""``grand retry-failed --level N``: recompute only the images that failed.

For every committed unit of level N with error rows, the error rows are recomputed; then, for
each later level committed for that unit, the rows of those same images are recomputed too
(their inputs changed). Every other row is kept as it was: the new table is the old one with
just those rows swapped in (an Arrow ``take``, no Python round trip), so untouched rows keep
their exact values. Each rewritten unit goes through :func:`~grand_pipeline.commit.commit` with
``replace``: a fresh claim, the old marker removed, the new Parquet published, a new marker
written last.
A kill in between leaves the unit uncommitted, and ``grand run`` recomputes it whole.

The work runs in-process (no Ray): failed images are few, and the runners load once per level.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from grand_pipeline.commit import commit
from grand_pipeline.config import ConfigError, GrandConfig
from grand_pipeline.engine.runner import LevelRunner
from grand_pipeline.run_meta import RunMeta
from grand_pipeline.schemas import STATUS_ERROR
from grand_pipeline.sources import list_shards
from grand_pipeline.store import Store, StoreError
from grand_pipeline.units import UnitRef, split_unit_id

logger = logging.getLogger(__name__)

#: Marker fields carried over from the original commit: the retry does not redo the unit.
_KEPT = ("seconds", "stage_seconds", "started", "finished", "host", "models", "config_hash")


@dataclass
class RetrySummary:
    attempt: int = 0
    #: level -> unit -> image ids recomputed there
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
        raise StoreError(f"recomputed rows for images not in the unit: {sorted(missing)[:5]}")
    combined = pa.concat_tables([old, new_rows.cast(old.schema)]).combine_chunks()
    return combined.take(pa.array(indices, pa.int64()))


def retry_failed(
    cfg: GrandConfig,
    output_uri: str,
    level: int,
    input_uri: str | None = None,
) -> RetrySummary:
    store = Store(output_uri)
    run_meta = RunMeta(store)
    meta = run_meta.read_run_meta() or {}
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
    for unit in sorted(store.committed(level)):
        ids = failed_ids(store.read(level, unit, columns=["image_id", "status"]))
        if ids:
            todo[unit] = ids
    if not todo:
        return summary
    units = _unit_refs(store, refs, todo, source)
    summary.attempt = run_meta.next_attempt()
    runners: dict[int, LevelRunner] = {}
    for unit, ids in todo.items():
        for lv in [level, *later]:
            if lv != level and unit not in store.committed(lv):
                break  # the next `grand run` computes it, from the new level below
            runner = runners.get(lv) or runners.setdefault(lv, LevelRunner(cfg, lv))
            started = time.perf_counter()
            new_rows, _ = runner.run_unit(units[unit], output_uri, only=set(ids))
            old = store.read(lv, unit)
            table = splice(old, new_rows)
            marker = store.marker(lv, unit) or {}
            stats = {k: marker[k] for k in _KEPT if k in marker}
            stats.update(
                retried_images=len(ids),
                retry_seconds=round(time.perf_counter() - started, 3),
                retry_attempt=summary.attempt,
                retried_at=time.time(),
            )
            if not commit(store, lv, unit, table, stats, summary.attempt, replace=True):
                raise StoreError(f"level {lv} unit {unit}: another attempt holds the commit; rerun later")
            summary.recomputed.setdefault(lv, {})[unit] = list(ids)
            if lv == level:
                fixed = len(ids) - len(failed_ids(new_rows))
                summary.fixed += fixed
                summary.still_failed += len(ids) - fixed
            logger.info("level %d unit %s: %d image(s) recomputed", lv, unit, len(ids))
    return summary


def _unit_refs(store: Store, refs: dict, todo: dict[str, list[str]], source: str) -> dict[str, UnitRef]:
    """unit id -> UnitRef for the units to retry, from the shards' stored indexes."""
    out: dict[str, UnitRef] = {}
    for shard in sorted({split_unit_id(unit)[0] for unit in todo}):
        if shard not in refs:
            raise StoreError(f"shard {shard} is not in the input {source}")
        index = RunMeta(store).read_index(shard)
        if index is None:
            raise StoreError(f"shard {shard} has committed units but no stored unit index in {store.uri}")
        out.update({unit.unit_id: unit for unit in index.units(refs[shard])})
    return out
