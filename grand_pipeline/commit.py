"""The exactly-once commit of one (level, unit): staging, claim, publish, marker last.

A unit's rows are streamed into a staging Parquet of the attempt (:func:`stage_writer`), then
:func:`commit_staged` claims the (level, unit) (:mod:`grand_pipeline.fencing`), publishes the
Parquet and writes the marker last. A kill at any moment leaves either the old state or the new
one, plus staging debris that :func:`clear_staging` removes. The Parquet bytes are a pure function
of the table, so a rerun after a crash writes exactly what the undisturbed run would have written.

Concurrent attempts (a RayJob retry starting a second driver while the first still runs) are
fenced: only the attempt that holds a (level, unit)'s claim publishes it, so exactly one of two
concurrent commits wins; the loser discards its staging and the commit returns False. On object
stores there is no rename: publishing is a server-side copy, each object appears whole or not at
all, and since the marker is written last (and names the Parquet's size and sha256) a unit is
still all-or-nothing.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re

import pyarrow as pa

from grand_pipeline import fencing
from grand_pipeline.markers import marker_record
from grand_pipeline.schemas import level_schema
from grand_pipeline.store import RUN_DIR, STAGING, SchemaMismatch, Store, check_unit_id
from grand_pipeline.unit_writer import StagedUnit, UnitWriter

logger = logging.getLogger(__name__)

_STAGED_ATTEMPT_RE = re.compile(r"\.a(\d+)\.[0-9a-f]{32}")
#: An attempt of another host counts as live this long after it started (its process cannot be
#: looked up from here): its staging files are kept until then.
_ATTEMPT_LEASE_S = 6 * 3600


def stage_writer(store: Store, level: int, unit: str, attempt: int) -> UnitWriter:
    """A writer that streams (level, unit)'s rows to a staging file of ``attempt``; its
    ``close()`` gives the :class:`StagedUnit` that :func:`commit_staged` publishes."""
    check_unit_id(unit)  # before anything is created
    staged = store.staging_path(store.level_dir(level), unit, attempt) + ".parquet"
    return UnitWriter(store.fs, staged, level, unit, level_schema(level))


def check_schema(level: int, unit: str, table: pa.Table) -> None:
    declared = level_schema(level)
    if not table.schema.equals(declared, check_metadata=False):
        raise SchemaMismatch(f"level {level} unit {unit}: {_first_difference(table.schema, declared)}")


def _first_difference(got: pa.Schema, want: pa.Schema) -> str:
    for i, expected in enumerate(want):
        if i >= len(got):
            return f"field {expected.name!r} is missing"
        actual = got.field(i)
        if actual.name != expected.name:
            return f"field {expected.name!r} expected at position {i}, found {actual.name!r}"
        if not actual.equals(expected, check_metadata=False):
            return f"field {expected.name!r}: expected {expected}, got {actual}"
    return f"field {got.field(len(want)).name!r} is not declared"


def commit(
    store: Store, level: int, unit: str, table: pa.Table, stats: dict, attempt: int, replace: bool = False
) -> bool:
    """Publish ``table`` as (level, unit): staged through a :class:`UnitWriter` (the bytes do
    not depend on how the caller chunked its rows), then :func:`commit_staged`."""
    check_schema(level, unit, table)
    writer = stage_writer(store, level, unit, attempt)
    try:
        writer.write(table)
        staged = writer.close()
    except BaseException:
        writer.abort()
        raise
    return commit_staged(store, staged, stats, attempt, replace)


def commit_staged(store: Store, staged: StagedUnit, stats: dict, attempt: int, replace: bool = False) -> bool:
    """Publish a staged unit. False when another commit is valid (fenced) or another live
    attempt holds the claim; the staged file is removed either way.

    Order: (staged Parquet), claim (:mod:`grand_pipeline.fencing`), publish Parquet, publish
    marker. A crash before the marker leaves a Parquet without marker, which is not committed
    and is overwritten next time. ``replace`` rewrites a committed unit (retry-failed): the
    old marker is removed before the new Parquet is published.
    """
    level, unit = staged.level, staged.unit
    final, marker = store.parquet_path(level, unit), store.marker_path(level, unit)
    claims = store.claim_dir(level, unit)
    try:
        if not replace and store.is_committed(level, unit):
            logger.info("level %d unit %s already committed; attempt %d discarded", level, unit, attempt)
            return False
        claim = fencing.acquire(
            store.fs, claims, attempt, lambda: store.is_committed(level, unit), store.claim_wait_s,
            replace=replace,
        )
        if claim.state != "own":
            logger.info(
                "level %d unit %s: %s by attempt %s; attempt %d discarded", level, unit,
                claim.state, (claim.record or {}).get("attempt"), attempt,
            )
            return False
        if replace:
            store.remove(marker)
        store.publish(staged.path, final)
    finally:
        store.remove(staged.path)

    record = marker_record(level, unit, attempt, stats, staged.counts, staged.size, staged.sha256, claim.generation)
    if not fencing.still_owner(store.fs, claims, claim.generation):
        # Presumed dead (lease expired) and taken over while publishing: the new holder
        # writes the marker. The Parquet bytes are the same whoever published them.
        logger.warning("level %d unit %s: claim taken over; attempt %d leaves the marker", level, unit, attempt)
        return False
    store.write_atomic(marker, json.dumps(record, sort_keys=True, indent=1).encode())
    logger.info("committed level %d unit %s (%d rows, attempt %d)", level, unit, record["rows"], attempt)
    return True


def clear_staging(store: Store, level: int) -> None:
    """Remove leftovers of dead attempts; files of attempts that may still run are kept."""
    path = posixpath.join(store.level_dir(level), STAGING)
    try:
        names = store.fs.ls(path, detail=False)
    except FileNotFoundError:
        return
    live: dict[int, bool] = {}
    for name in names:
        match = _STAGED_ATTEMPT_RE.search(posixpath.basename(name.rstrip("/")))
        attempt = int(match.group(1)) if match else 0
        if attempt and attempt not in live:
            record = fencing.attempt_record(store.fs, store.path(RUN_DIR), attempt)
            live[attempt] = record is not None and fencing.is_live(record, lease_s=_ATTEMPT_LEASE_S)
        if not live.get(attempt, False):
            store.remove(name)
