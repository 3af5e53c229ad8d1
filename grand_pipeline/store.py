"""Output store: one Parquet per (level, shard), and the exactly-once commit protocol.

Layout under ``OUT`` (a local path or any fsspec URI)::

    OUT/_run/config.yaml, run.json, shards.json, attempt
    OUT/level{N}/{shard}.parquet
    OUT/level{N}/{shard}.success.json     commit marker, written LAST
    OUT/level{N}/_staging/...             temporary files of in-flight (or killed) commits

A (level, shard) is done only when its marker parses and the Parquet next to it has the size and
sha256 the marker records. Every write goes to a staging name first and is then published by
:meth:`Store._publish`, so a kill at any moment leaves either the old state or the new one, plus
staging debris that :meth:`Store.clear_staging` removes. The Parquet bytes are a pure function of
the table, so a rerun after a crash writes exactly what the undisturbed run would have written.

The store knows schemas and file systems only: it never imports models, levels, Ray or the CLI.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import time
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from grand_pipeline.schemas import STATUS_ERROR, STATUS_OK, level_schema

logger = logging.getLogger(__name__)

MARKER_SUFFIX = ".success.json"
STAGING = "_staging"
RUN_DIR = "_run"
_SHARD_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_LEVEL_DIR_RE = re.compile(r"^level(\d+)$")
_MARKER_REQUIRED = ("level", "shard", "attempt", "rows", "parquet_bytes", "parquet_sha256")

# Every option is pinned, not left to pyarrow's defaults, so that a default changing between
# versions cannot silently make a rerun's bytes differ. Arrow writes no timestamps into Parquet;
# its only version-dependent field is ``created_by``, so identity holds within one pyarrow version.
_PARQUET_OPTIONS: dict[str, Any] = dict(
    compression="zstd",
    compression_level=3,
    use_dictionary=True,
    write_statistics=True,
    version="2.6",
    data_page_version="1.0",
    store_schema=True,
)


class StoreError(Exception):
    """A problem with the output store (bad shard id, unreadable layout, ...)."""


class SchemaMismatch(StoreError):
    """A table handed to :meth:`Store.commit` does not match its level's declared schema."""


class NotCommitted(StoreError):
    """A read asked for a (level, shard) that has no valid commit."""


def check_shard_id(shard: str) -> str:
    # Shard ids come from tar names and user globs; they must never turn into arbitrary paths.
    # A leading dot is refused too, so that no shard can hide as a dotfile.
    if not isinstance(shard, str) or not _SHARD_RE.match(shard) or ".." in shard or shard.startswith("."):
        raise StoreError(f"invalid shard id {shard!r}: use letters, digits, '_', '-', '.' (no '..')")
    return shard


def _check_level(level: int) -> int:
    if isinstance(level, bool) or not isinstance(level, int) or level < 0:
        raise StoreError(f"invalid level {level!r}: expected a non-negative integer")
    return level


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


class Store:
    """Output store rooted at ``uri``; the fs and root path come from ``fsspec.core.url_to_fs``."""

    def __init__(self, uri: str):
        self.uri = str(uri)
        self.fs, root = fsspec.core.url_to_fs(self.uri)
        self.root = root.rstrip("/") or "/"
        self._made: set[str] = set()

    # ---- paths -------------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def level_dir(self, level: int) -> str:
        return self._path(f"level{_check_level(level)}")

    def parquet_path(self, level: int, shard: str) -> str:
        return posixpath.join(self.level_dir(level), f"{check_shard_id(shard)}.parquet")

    def marker_path(self, level: int, shard: str) -> str:
        return posixpath.join(self.level_dir(level), f"{check_shard_id(shard)}{MARKER_SUFFIX}")

    def _staging_path(self, directory: str, name: str) -> str:
        return posixpath.join(directory, STAGING, f"{name}.{uuid.uuid4().hex}")

    # ---- low-level IO ------------------------------------------------------------------------
    def _makedirs(self, directory: str) -> None:
        # Object stores have no directories; local ones need them. Remember what exists already.
        if directory not in self._made:
            self.fs.makedirs(directory, exist_ok=True)
            self._made.add(directory)

    def _publish(self, src: str, dst: str) -> None:
        """Make ``src`` visible as ``dst``, overwriting it. The single place that publishes.

        Locally this is ``os.replace``: atomic, and it overwrites (``shutil.move``, which
        fsspec's local ``mv`` uses, does not promise that). Elsewhere it is ``fs.mv``. Issue #4
        replaces the object-store branch with a conditional put.
        """
        self._makedirs(posixpath.dirname(dst))
        if isinstance(self.fs, LocalFileSystem):
            os.replace(src, dst)
        else:
            self.fs.mv(src, dst)

    def _write_atomic(self, path: str, data: bytes) -> None:
        staged = self._staging_path(posixpath.dirname(path), posixpath.basename(path))
        self._makedirs(posixpath.dirname(staged))
        self.fs.pipe_file(staged, data)
        try:
            self._publish(staged, path)
        except BaseException:
            self._remove(staged)
            raise

    def _remove(self, path: str) -> None:
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    def _read_bytes(self, path: str) -> bytes | None:
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None

    def _sha256_of(self, path: str) -> str:
        digest = hashlib.sha256()
        with self.fs.open(path, "rb") as handle:
            while chunk := handle.read(8 << 20):
                digest.update(chunk)
        return digest.hexdigest()

    # ---- commit protocol ---------------------------------------------------------------------
    def commit(self, level: int, shard: str, table: pa.Table, stats: dict, attempt: int) -> bool:
        """Publish ``table`` as (level, shard). False when a valid commit already exists (fenced).

        Order: stage Parquet, fence, publish Parquet, publish marker. A crash before the marker
        leaves a Parquet without marker, which is not committed and is overwritten next time.
        """
        declared = level_schema(level)
        if not table.schema.equals(declared, check_metadata=False):
            raise SchemaMismatch(f"level {level} shard {shard}: {_first_difference(table.schema, declared)}")
        final, marker = self.parquet_path(level, shard), self.marker_path(level, shard)

        # Rebuild on the declared schema (drops any schema metadata, e.g. pandas') and merge
        # chunks, so that how the caller batched its rows cannot change the bytes written.
        table = pa.Table.from_arrays(table.columns, schema=declared).combine_chunks()
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, **_PARQUET_OPTIONS)
        data = sink.getvalue().to_pybytes()
        staged = self._staging_path(self.level_dir(level), f"{shard}.a{attempt}") + ".parquet"
        self._makedirs(posixpath.dirname(staged))
        self.fs.pipe_file(staged, data)
        try:
            if self.is_committed(level, shard):
                logger.info(
                    "level %d shard %s already committed; attempt %d discarded", level, shard, attempt
                )
                return False
            self._publish(staged, final)
        finally:
            self._remove(staged)

        counts = table_counts(table)
        # The table is the truth; a caller's differing count is a bug worth seeing, not storing.
        differ = {k: stats[k] for k in counts if k in stats and stats[k] != counts[k]}
        if differ:
            logger.warning(
                "level %d shard %s: stats %r differ from the table; kept %r", level, shard, differ, counts
            )
        seconds = float(stats.get("seconds", 0.0) or 0.0)
        record = {k: v for k, v in stats.items() if k not in counts}
        record.update(counts)
        record.update(
            level=level,
            shard=shard,
            attempt=attempt,
            seconds=seconds,
            images_per_second=counts["rows"] / seconds if seconds > 0 else 0.0,
            models=stats.get("models"),
            config_hash=stats.get("config_hash"),
            parquet_bytes=len(data),
            parquet_sha256=hashlib.sha256(data).hexdigest(),
            committed_at=time.time(),
        )
        self._write_atomic(marker, json.dumps(record, sort_keys=True, indent=1).encode())
        logger.info(
            "committed level %d shard %s (%d rows, attempt %d)", level, shard, counts["rows"], attempt
        )
        return True

    def _parse_marker(self, level: int, shard: str, raw: bytes | None, path: str) -> dict | None:
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if (
            not isinstance(data, dict)
            or any(k not in data for k in _MARKER_REQUIRED)
            or data["level"] != level
            or data["shard"] != shard
        ):
            logger.warning("ignoring unparseable commit marker %s", path)
            return None
        return data

    def marker(self, level: int, shard: str) -> dict | None:
        path = self.marker_path(level, shard)
        return self._parse_marker(level, shard, self._read_bytes(path), path)

    def is_committed(self, level: int, shard: str) -> bool:
        """Marker parses and the Parquet has the size and sha256 it records (reads the Parquet)."""
        record = self.marker(level, shard)
        if record is None:
            return False
        path = self.parquet_path(level, shard)
        try:
            if self.fs.size(path) != record["parquet_bytes"]:
                return False
        except FileNotFoundError:
            return False
        return self._sha256_of(path) == record["parquet_sha256"]

    def committed(self, level: int, verify: bool = False) -> dict[str, dict]:
        """shard -> marker for every valid commit of ``level``, from one directory listing.

        Without ``verify`` a commit is valid when its marker parses and the listed Parquet has
        the recorded size; hashing every Parquet of a level is left to ``verify=True``.
        """
        directory = self.level_dir(level)
        try:
            entries = self.fs.ls(directory, detail=True)
        except FileNotFoundError:
            return {}
        sizes = {posixpath.basename(e["name"].rstrip("/")): e.get("size") for e in entries}
        shards = sorted(n[: -len(MARKER_SUFFIX)] for n in sizes if n.endswith(MARKER_SUFFIX))
        shards = [s for s in shards if _SHARD_RE.match(s) and ".." not in s and not s.startswith(".")]
        paths = {s: posixpath.join(directory, s + MARKER_SUFFIX) for s in shards}
        blobs = self.fs.cat(list(paths.values()), on_error="omit") if paths else {}
        blobs = {self.fs._strip_protocol(k): v for k, v in blobs.items()}
        out: dict[str, dict] = {}
        for shard, path in paths.items():
            record = self._parse_marker(level, shard, blobs.get(self.fs._strip_protocol(path)), path)
            if record is None or sizes.get(f"{shard}.parquet") != record["parquet_bytes"]:
                continue
            if verify and self._sha256_of(self.parquet_path(level, shard)) != record["parquet_sha256"]:
                continue
            out[shard] = record
        return out

    def read(self, level: int, shard: str, columns: list[str] | None = None) -> pa.Table:
        """The committed table. The bytes are checked against the marker before they are parsed."""
        record = self.marker(level, shard)
        data = self._read_bytes(self.parquet_path(level, shard)) if record else None
        if (
            record is None
            or data is None
            or len(data) != record["parquet_bytes"]
            or hashlib.sha256(data).hexdigest() != record["parquet_sha256"]
        ):
            raise NotCommitted(f"level {level} shard {shard} is not committed in {self.uri}")
        # use_threads=False: with pyarrow 26, a threaded Parquet read leaves pool threads that
        # abort the interpreter at exit now and then ("terminate called without an active
        # exception"). One shard is decoded per call; parallelism comes from running shards.
        return pq.read_table(pa.BufferReader(data), columns=columns, use_threads=False)

    def clear(self, level: int, shard: str) -> None:
        # Marker first: once it is gone the shard is uncommitted, whatever happens to the rest.
        self._remove(self.marker_path(level, shard))
        self._remove(self.parquet_path(level, shard))

    def clear_staging(self, level: int) -> None:
        """Remove leftovers of killed runs. Only safe while no other run writes this level."""
        path = posixpath.join(self.level_dir(level), STAGING)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    # ---- run metadata ------------------------------------------------------------------------
    def _run_path(self, name: str) -> str:
        return self._path(RUN_DIR, name)

    def _read_json(self, path: str) -> Any:
        raw = self._read_bytes(path)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            logger.warning("ignoring unparseable %s", path)
            return None

    def write_run_meta(self, config_yaml: str, run_info: dict) -> None:
        self._write_atomic(self._run_path("config.yaml"), config_yaml.encode())
        self._write_atomic(
            self._run_path("run.json"), json.dumps(run_info, sort_keys=True, indent=1).encode()
        )

    def read_run_meta(self) -> dict | None:
        """The ``run.json`` written by :meth:`write_run_meta`, or None."""
        data = self._read_json(self._run_path("run.json"))
        return data if isinstance(data, dict) else None

    def read_config_yaml(self) -> str | None:
        raw = self._read_bytes(self._run_path("config.yaml"))
        return raw.decode() if raw is not None else None

    def _shards_doc(self) -> dict:
        data = self._read_json(self._run_path("shards.json"))
        if not isinstance(data, dict):
            return {"shards": [], "by_level": {}}
        return {"shards": list(data.get("shards", [])), "by_level": dict(data.get("by_level", {}))}

    def record_shards(self, level: int | None, shard_ids: list[str]) -> None:
        """Add ``shard_ids`` to the run's known input shards (and to ``level``'s, if given)."""
        ids = {check_shard_id(s) for s in shard_ids}
        doc = self._shards_doc()
        doc["shards"] = sorted(set(doc["shards"]) | ids)
        if level is not None:
            key = str(_check_level(level))
            doc["by_level"][key] = sorted(set(doc["by_level"].get(key, [])) | ids)
        self._write_atomic(self._run_path("shards.json"), json.dumps(doc, sort_keys=True, indent=1).encode())

    def known_shards(self, level: int | None = None) -> list[str]:
        """The run's known shards; for ``level``, its own list when one was recorded."""
        doc = self._shards_doc()
        if level is not None and str(level) in doc["by_level"]:
            return list(doc["by_level"][str(level)])
        return doc["shards"]

    def next_attempt(self) -> int:
        """Read, increment and store the run-level attempt counter.

        This is not a lock: two runs starting at once can draw the same number. Fencing
        concurrent writers is a later issue; today the counter only labels commits.
        """
        raw = self._read_bytes(self._run_path("attempt"))
        try:
            current = int(raw.decode().strip()) if raw is not None else 0
        except ValueError:
            logger.warning("attempt counter unreadable; restarting from 0")
            current = 0
        self._write_atomic(self._run_path("attempt"), f"{current + 1}\n".encode())
        return current + 1

    # ---- summary -----------------------------------------------------------------------------
    def levels_present(self) -> list[int]:
        try:
            names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for n in names if (m := _LEVEL_DIR_RE.match(n)))

    def status(self, levels: list[int] | None = None) -> dict:
        """JSON-ready progress summary. Matrix keys are level numbers as strings (JSON keys)."""
        known = self.known_shards()
        wanted = sorted(set(levels or []) | set(self.levels_present()))
        summaries, matrix_levels = [], {}
        for level in wanted:
            markers = self.committed(level)
            if not markers and level not in (levels or []):
                continue
            rows = sum(m["rows"] for m in markers.values())
            seconds = sum(float(m.get("seconds") or 0.0) for m in markers.values())
            by_stage: dict[str, int] = {}
            for m in markers.values():
                for stage, n in (m.get("failures_by_stage") or {}).items():
                    by_stage[stage] = by_stage.get(stage, 0) + int(n)
            summaries.append(
                {
                    "level": level,
                    "shards_committed": len(markers),
                    "shards_total": len(set(self.known_shards(level)) | set(markers)),
                    "images_ok": sum(int(m.get("ok", 0)) for m in markers.values()),
                    "images_failed": sum(int(m.get("failed", 0)) for m in markers.values()),
                    "failures_by_stage": dict(sorted(by_stage.items())),
                    "seconds": seconds,
                    "images_per_second": rows / seconds if seconds > 0 else 0.0,
                }
            )
            matrix_levels[level] = markers
        all_shards = sorted(set(known).union(*(set(m) for m in matrix_levels.values())))
        matrix = {
            shard: {str(lv): ("committed" if shard in m else "missing") for lv, m in matrix_levels.items()}
            for shard in all_shards
        }
        return {"shards": known, "levels": summaries, "matrix": matrix}
