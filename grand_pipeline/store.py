"""Output store: one Parquet per (level, shard), and the exactly-once commit protocol.

Layout under ``OUT`` (a local path or any fsspec URI)::

    OUT/_run/config.yaml, run.json, shards.json
    OUT/_run/attempts/{n:06d}.json        attempt n, created exclusively (who: host, pid)
    OUT/level{N}/{shard}.parquet
    OUT/level{N}/{shard}.success.json     commit marker, written LAST
    OUT/level{N}/_claims/{shard}/{g:06d}.json   commit claims, created exclusively (the commit log)
    OUT/level{N}/_staging/...             temporary files of in-flight (or killed) commits

A (level, shard) is done only when its marker parses and the Parquet next to it has the size and
sha256 the marker records. Every write goes to a staging name first and is then published by
:meth:`Store._publish`, so a kill at any moment leaves either the old state or the new one, plus
staging debris that :meth:`Store.clear_staging` removes. The Parquet bytes are a pure function of
the table, so a rerun after a crash writes exactly what the undisturbed run would have written.

Concurrent attempts (a RayJob retry starting a second driver while the first still runs) are
fenced by :mod:`grand_pipeline.fencing`: only the attempt that holds a (level, shard)'s claim
publishes it, so exactly one of two concurrent commits wins; the loser discards its staging and
``commit`` returns False. On object stores there is no rename: publishing is a server-side copy,
each object appears whole or not at all, and since the marker is written last (and names the
Parquet's size and sha256) a shard is still all-or-nothing.

Marker fields (JSON; the dashboard and ``grand plan`` read them):

- identity: ``level``, ``shard``, ``attempt`` (run attempt that committed), ``generation``
  (its claim), ``host``, ``config_hash``, ``models``, ``parquet_bytes``, ``parquet_sha256``;
- counts, from the table: ``images`` (= ``rows``), ``ok``, ``errors`` (= ``failed``),
  ``errors_by_stage`` (= ``failures_by_stage``, stage -> count);
- timing: ``started``, ``finished``, ``committed_at`` (unix seconds), ``duration_s``
  (= ``seconds``, compute time of the shard), ``images_per_s`` (= ``images_per_second``),
  ``stage_seconds`` (stage -> seconds spent in it for this shard), ``attempt_retries``.

The store knows schemas and file systems only: it never imports models, levels, Ray or the CLI.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from grand_pipeline import fencing
from grand_pipeline.markers import marker_record
from grand_pipeline.schemas import STATUS_ERROR, STATUS_OK, level_schema

logger = logging.getLogger(__name__)

MARKER_SUFFIX = ".success.json"
STAGING = "_staging"
RUN_DIR = "_run"
_SHARD_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_LEVEL_DIR_RE = re.compile(r"^level(\d+)$")
_STAGED_ATTEMPT_RE = re.compile(r"\.a(\d+)\.[0-9a-f]{32}")
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


def publish(fs: Any, src: str, dst: str) -> None:
    """Make ``src`` visible as ``dst``, overwriting it (the parent folder must exist locally).

    Locally this is ``os.replace``: atomic, and it overwrites (``shutil.move``, which fsspec's
    local ``mv`` uses, does not promise that). Elsewhere it is ``fs.mv``: on S3 a server-side copy
    (the destination appears whole) and a delete. Nothing relies on it being atomic there: only
    a claim holder publishes, and the marker, written last, decides.
    """
    if isinstance(fs, LocalFileSystem):
        os.replace(src, dst)
    else:
        fs.mv(src, dst)


def remove_quietly(fs: Any, path: str) -> None:
    """Delete ``path`` if it exists."""
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def put_atomic(fs: Any, staged: str, path: str, data: bytes, publish_fn: Any = None) -> None:
    """Write ``data`` to the staging name ``staged``, then publish it as ``path``; the staged file is
    removed if publishing fails, so a reader sees the whole file or none."""
    fs.pipe_file(staged, data)
    try:
        (publish_fn or (lambda a, b: publish(fs, a, b)))(staged, path)
    except BaseException:
        remove_quietly(fs, staged)
        raise


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

    def __init__(self, uri: str, claim_wait_s: float = 120.0):
        self.uri = str(uri)
        # Other attempts write here too: a cached listing would hide their claims and markers.
        local = fsspec.utils.get_protocol(self.uri) in ("file", "local")
        self.fs, root = fsspec.core.url_to_fs(self.uri, **({} if local else {"use_listings_cache": False}))
        self.root = root.rstrip("/") or "/"
        self._made: set[str] = set()
        #: This process's attempt, once :meth:`next_attempt` took one (tags staging files).
        self.attempt = 0
        #: How long a commit waits for another live attempt that holds the claim.
        self.claim_wait_s = claim_wait_s

    # ---- paths -------------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def level_dir(self, level: int) -> str:
        return self._path(f"level{_check_level(level)}")

    def parquet_path(self, level: int, shard: str) -> str:
        return posixpath.join(self.level_dir(level), f"{check_shard_id(shard)}.parquet")

    def marker_path(self, level: int, shard: str) -> str:
        return posixpath.join(self.level_dir(level), f"{check_shard_id(shard)}{MARKER_SUFFIX}")

    def _staging_path(self, directory: str, name: str, attempt: int | None = None) -> str:
        # The attempt tag lets clear_staging spare the files of attempts that still run.
        tag = self.attempt if attempt is None else attempt
        return posixpath.join(directory, STAGING, f"{name}.a{tag}.{uuid.uuid4().hex}")

    def claim_dir(self, level: int, shard: str) -> str:
        return fencing.claim_dir(self.level_dir(level), check_shard_id(shard))

    # ---- low-level IO ------------------------------------------------------------------------
    def _makedirs(self, directory: str) -> None:
        # Object stores have no directories; local ones need them. Remember what exists already.
        if directory not in self._made:
            self.fs.makedirs(directory, exist_ok=True)
            self._made.add(directory)

    def _publish(self, src: str, dst: str) -> None:
        """Make ``src`` visible as ``dst``, overwriting it: :func:`publish`, the single place."""
        self._makedirs(posixpath.dirname(dst))
        publish(self.fs, src, dst)

    def _write_atomic(self, path: str, data: bytes) -> None:
        staged = self._staging_path(posixpath.dirname(path), posixpath.basename(path))
        self._makedirs(posixpath.dirname(staged))
        put_atomic(self.fs, staged, path, data, self._publish)

    def _remove(self, path: str) -> None:
        remove_quietly(self.fs, path)

    def read_file(self, *parts: str) -> bytes | None:
        """The bytes of ``OUT/<parts>`` (e.g. ``glamm/train_log.jsonl``), or None when absent."""
        return self._read_bytes(self._path(*parts))

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
    def commit(
        self, level: int, shard: str, table: pa.Table, stats: dict, attempt: int, replace: bool = False
    ) -> bool:
        """Publish ``table`` as (level, shard). False when another commit is valid (fenced) or
        another live attempt holds the claim; the caller's staging is discarded either way.

        Order: stage Parquet, claim (:mod:`grand_pipeline.fencing`), publish Parquet, publish
        marker. A crash before the marker leaves a Parquet without marker, which is not committed
        and is overwritten next time. ``replace`` rewrites a committed shard (retry-failed): the
        old marker is removed before the new Parquet is published.
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
        staged = self._staging_path(self.level_dir(level), shard, attempt) + ".parquet"
        self._makedirs(posixpath.dirname(staged))
        self.fs.pipe_file(staged, data)
        claims = self.claim_dir(level, shard)
        try:
            if not replace and self.is_committed(level, shard):
                logger.info("level %d shard %s already committed; attempt %d discarded", level, shard, attempt)
                return False
            claim = fencing.acquire(
                self.fs, claims, attempt, lambda: self.is_committed(level, shard), self.claim_wait_s,
                replace=replace,
            )
            if claim.state != "own":
                logger.info(
                    "level %d shard %s: %s by attempt %s; attempt %d discarded", level, shard,
                    claim.state, (claim.record or {}).get("attempt"), attempt,
                )
                return False
            if replace:
                self._remove(marker)
            self._publish(staged, final)
        finally:
            self._remove(staged)

        record = marker_record(level, shard, attempt, stats, table_counts(table), data, claim.generation)
        if not fencing.still_owner(self.fs, claims, claim.generation):
            # Presumed dead (lease expired) and taken over while publishing: the new holder
            # writes the marker. The Parquet bytes are the same whoever published them.
            logger.warning("level %d shard %s: claim taken over; attempt %d leaves the marker", level, shard, attempt)
            return False
        self._write_atomic(marker, json.dumps(record, sort_keys=True, indent=1).encode())
        logger.info(
            "committed level %d shard %s (%d rows, attempt %d)", level, shard, record["rows"], attempt
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
        """Remove leftovers of dead attempts; files of attempts that may still run are kept."""
        path = posixpath.join(self.level_dir(level), STAGING)
        try:
            names = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return
        live: dict[int, bool] = {}
        for name in names:
            match = _STAGED_ATTEMPT_RE.search(posixpath.basename(name.rstrip("/")))
            attempt = int(match.group(1)) if match else 0
            if attempt and attempt not in live:
                record = fencing.attempt_record(self.fs, self._path(RUN_DIR), attempt)
                live[attempt] = record is not None and fencing.is_live(record, lease_s=6 * 3600)
            if not live.get(attempt, False):
                self._remove(name)

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
        """Take this process's attempt number: unique even when two drivers start at once."""
        raw = self._read_bytes(self._run_path("attempt"))  # counter of stores before fencing
        try:
            floor = int(raw.decode().strip()) if raw is not None else 0
        except ValueError:
            floor = 0
        self.attempt = fencing.take_attempt(self.fs, self._path(RUN_DIR), floor)
        return self.attempt

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
