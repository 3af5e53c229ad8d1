"""Stream a unit's rows into its staged Parquet, a row group at a time.

A unit's output grows with the unit (an SA-1B image at full resolution carries hundreds of KB of
RLE), so the runner does not hold it: each finished micro-batch is handed to a ``UnitWriter``,
which writes fixed row groups of :data:`ROW_GROUP_ROWS` rows to the unit's staging file and hashes
the bytes as they go. Memory is one row group plus one micro-batch, whatever the unit size.

The bytes are a pure function of the rows: row groups are cut at fixed row counts, never at
micro-batch edges, and every Parquet option is pinned, so a streamed unit is byte-identical to the
same table written at once (``tests/test_units.py`` checks it). Publishing, claims and the marker
stay with :func:`grand_pipeline.commit.commit_staged`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from grand_pipeline.schemas import STATUS_ERROR, STATUS_OK

#: Rows per Parquet row group: later levels stream a unit's rows a group at a time.
ROW_GROUP_ROWS = 64

# Every option is pinned, not left to pyarrow's defaults, so that a default changing between
# versions cannot silently make a rerun's bytes differ. Arrow writes no timestamps into Parquet;
# its only version-dependent field is ``created_by``, so identity holds within one pyarrow version.
PARQUET_OPTIONS: dict[str, Any] = dict(
    compression="zstd",
    compression_level=3,
    use_dictionary=True,
    write_statistics=True,
    version="2.6",
    data_page_version="1.0",
    store_schema=True,
)


@dataclass(frozen=True)
class StagedUnit:
    """A unit's Parquet written to staging, with what its marker records about it."""

    level: int
    unit: str
    path: str
    size: int
    sha256: str
    counts: dict[str, Any] = field(default_factory=dict)


def table_counts(table: pa.Table) -> dict[str, Any]:
    """rows, ok, failed and failures_by_stage as recorded in the table's own columns."""
    status = table.column("status")
    errors = pc.equal(status, STATUS_ERROR)
    by_stage: dict[str, int] = {}
    stages = pc.fill_null(pc.filter(table.column("error_stage"), errors), "unknown")
    for item in pc.value_counts(stages).to_pylist():
        by_stage[item["values"]] = int(item["counts"])
    return {
        "rows": table.num_rows,
        "ok": int(pc.sum(pc.cast(pc.equal(status, STATUS_OK), pa.int64())).as_py() or 0),
        "failed": int(pc.sum(pc.cast(errors, pa.int64())).as_py() or 0),
        "failures_by_stage": dict(sorted(by_stage.items())),
    }


class _HashingFile:
    """A write-only file that hashes and counts what passes through to ``inner``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.digest = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.digest.update(view)
        self.size += view.nbytes
        self.inner.write(view)
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.inner.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.inner.close()


class UnitWriter:
    """Write one (level, unit)'s rows to ``path`` on ``fs``; ``close`` returns the StagedUnit."""

    def __init__(self, fs: Any, path: str, level: int, unit: str, schema: pa.Schema) -> None:
        self.fs, self.path, self.level, self.unit, self.schema = fs, path, level, unit, schema
        self._file = _HashingFile(fs.open(path, "wb"))
        self._writer = pq.ParquetWriter(self._file, schema, **PARQUET_OPTIONS)
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._counts: dict[str, Any] = {"rows": 0, "ok": 0, "failed": 0, "failures_by_stage": {}}

    def write(self, table: pa.Table) -> None:
        """Append rows (already checked against ``schema`` by the caller)."""
        # Rebuilt on the declared schema: drops schema metadata, so the caller's cannot leak in.
        table = pa.Table.from_arrays(table.columns, schema=self.schema)
        self._add_counts(table_counts(table))
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= ROW_GROUP_ROWS:
            self._flush(ROW_GROUP_ROWS)

    def _flush(self, rows: int) -> None:
        merged = pa.concat_tables(self._pending).combine_chunks()
        self._writer.write_table(merged.slice(0, rows), row_group_size=ROW_GROUP_ROWS)
        rest = merged.slice(rows)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows

    def _add_counts(self, counts: dict[str, Any]) -> None:
        for key in ("rows", "ok", "failed"):
            self._counts[key] += counts[key]
        by_stage = self._counts["failures_by_stage"]
        for stage, n in counts["failures_by_stage"].items():
            by_stage[stage] = by_stage.get(stage, 0) + n

    def close(self) -> StagedUnit:
        if self._pending_rows:
            self._flush(self._pending_rows)
        self._writer.close()
        self._file.close()
        counts = dict(self._counts, failures_by_stage=dict(sorted(self._counts["failures_by_stage"].items())))
        return StagedUnit(self.level, self.unit, self.path, self._file.size, self._file.digest.hexdigest(), counts)

    def abort(self) -> None:
        """Close without publishing and remove the staged file (the unit failed)."""
        try:
            self._writer.close()
            self._file.close()
        except Exception:  # noqa: BLE001 - the unit already failed; its own error is the one to see
            pass
        finally:
            try:
                self.fs.rm_file(self.path)
            except FileNotFoundError:
                pass
