"""Output store: one Parquet per (level, shard), and the exactly-once commit protocol.

Layout under ``OUT`` (a local path or any fsspec URI)::

    OUT/_run/config.yaml, run.json, shards.json
    OUT/_run/units/{shard}.json          the shard's index: image ids in order, unit size, offsets
    OUT/_run/attempts/{n:06d}.json        attempt n, created exclusively (who: host, pid)
    OUT/level{N}/{unit}.parquet           unit = {shard}@{k:05d} (:mod:`grand_pipeline.units`)
    OUT/level{N}/{unit}.success.json      commit marker, written LAST
    OUT/level{N}/_claims/{unit}/{g:06d}.json    commit claims, created exclusively (the commit log)
    OUT/level{N}/_staging/...             temporary files of in-flight (or killed) commits

The unit of commit is a sub-shard unit of at most ``engine.unit_images`` images. Outputs written
before units (``level{N}/{shard}.parquet``) are refused with one line (:class:`OldLayout`).

A (level, unit) is done only when its marker parses and the Parquet next to it has the size and
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

- identity: ``level``, ``unit``, ``shard``, ``attempt`` (run attempt that committed), ``generation``
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
from collections.abc import Iterator
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from grand_pipeline import fencing
from grand_pipeline.markers import marker_record
from grand_pipeline.schemas import level_schema
from grand_pipeline.unit_writer import ROW_GROUP_ROWS, StagedUnit, UnitWriter
from grand_pipeline.units import UNIT_ID_RE, ShardIndex, UnitError, split_unit_id

logger = logging.getLogger(__name__)

MARKER_SUFFIX = ".success.json"
STAGING = "_staging"
RUN_DIR = "_run"
_SHARD_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_LEVEL_DIR_RE = re.compile(r"^level(\d+)$")
_STAGED_ATTEMPT_RE = re.compile(r"\.a(\d+)\.[0-9a-f]{32}")
_MARKER_REQUIRED = ("level", "unit", "attempt", "rows", "parquet_bytes", "parquet_sha256")
UNITS_DIR = "units"


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
    """A read asked for a (level, unit) that has no valid commit."""


class OldLayout(StoreError):
    """The output was written before sub-shard units (one Parquet per shard)."""


def check_unit_id(unit: str) -> str:
    try:
        shard, _ = split_unit_id(unit)
    except UnitError as exc:
        raise StoreError(str(exc)) from None
    check_shard_id(shard)
    return unit


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


def _refuse_old_layout(directory: str, marker_names: list[str]) -> None:
    old = [n for n in marker_names if _SHARD_RE.match(n) and not UNIT_ID_RE.match(n)]
    if old:
        raise OldLayout(
            f"{directory} holds per-shard commits written before sub-shard units (e.g. {old[0]}{MARKER_SUFFIX}); "
            "this version cannot resume them: write to a new --output folder"
        )


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


def _location(uri: str) -> tuple[str, str]:
    """(protocol, normalised absolute path) of ``uri``: local paths resolved (symlinks, ``..``),
    other URIs by their filesystem's own protocol name (``s3a://`` is ``s3://``)."""
    protocol = fsspec.utils.get_protocol(uri)
    if protocol in ("file", "local"):
        return "file", os.path.realpath(LocalFileSystem._strip_protocol(uri))
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError):  # an unknown protocol fails later with its own message
        return protocol, posixpath.normpath("/" + uri.split("://", 1)[-1])
    name = cls.protocol if isinstance(cls.protocol, str) else cls.protocol[0]
    return name, posixpath.normpath("/" + cls._strip_protocol(uri).strip("/"))


def check_separate(input_uri: str, output_uri: str) -> None:
    """Refuse an output inside (or equal to) the input folder: the input listing would pick up the
    output's own files, and a mistaken run must be refused before it writes anything."""
    (in_proto, in_path), (out_proto, out_path) = _location(input_uri), _location(output_uri)
    if in_proto == out_proto and (out_path == in_path or out_path.startswith(in_path.rstrip("/") + "/")):
        raise StoreError(
            f"--output {output_uri} is inside --input {input_uri}: write the output outside the input folder"
        )


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

    def parquet_path(self, level: int, unit: str) -> str:
        return posixpath.join(self.level_dir(level), f"{check_unit_id(unit)}.parquet")

    def marker_path(self, level: int, unit: str) -> str:
        return posixpath.join(self.level_dir(level), f"{check_unit_id(unit)}{MARKER_SUFFIX}")

    def _staging_path(self, directory: str, name: str, attempt: int | None = None) -> str:
        # The attempt tag lets clear_staging spare the files of attempts that still run.
        tag = self.attempt if attempt is None else attempt
        return posixpath.join(directory, STAGING, f"{name}.a{tag}.{uuid.uuid4().hex}")

    def claim_dir(self, level: int, unit: str) -> str:
        return fencing.claim_dir(self.level_dir(level), check_unit_id(unit))

    # ---- checks of the location (one line instead of a traceback) ----------------------------
    def require_existing(self) -> None:
        """For commands that read a run: the output must be a folder (or a non-empty prefix)."""
        try:
            exists, is_dir = self.fs.exists(self.root), self.fs.isdir(self.root)
        except OSError as exc:
            raise StoreError(f"output {self.uri} cannot be read: {exc.strerror or exc}") from None
        if not exists:
            raise StoreError(f"output {self.uri} does not exist: check --output, or run `grand run` first")
        if not is_dir:
            raise StoreError(f"output {self.uri} is a file, not an output folder")

    def check_no_file_in_the_way(self) -> None:
        """Refuse a local output that is a file or lies under one (reads only: a run checks this
        before it even reads the output's commits)."""
        if not isinstance(self.fs, LocalFileSystem):
            return
        blocker = next((p for p in _ancestors(self.root) if os.path.exists(p) and not os.path.isdir(p)), None)
        if blocker is not None:
            where = "is a file" if blocker == self.root else f"is under the file {blocker}"
            raise StoreError(f"output {self.uri} {where}: --output must be a folder")

    def check_writable(self) -> None:
        """Create the output folder and write + remove a probe file there, so that a file in the
        way, a read-only folder or ``/proc`` is one clear line before any run metadata exists.

        Object stores have no folders and their permissions show at the first write; they are
        not probed (the first write's error names the path).
        """
        if not isinstance(self.fs, LocalFileSystem):
            return
        self.check_no_file_in_the_way()
        probe = self._path(f".grand-write-probe.{uuid.uuid4().hex}")
        try:
            os.makedirs(self.root, exist_ok=True)
            with open(probe, "xb"):
                pass
            os.remove(probe)
        except OSError as exc:
            raise StoreError(f"output {self.uri} is not writable: {exc.strerror or exc}") from None

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
    def stage_writer(self, level: int, unit: str, attempt: int) -> UnitWriter:
        """A writer that streams (level, unit)'s rows to a staging file of ``attempt``; its
        ``close()`` gives the :class:`StagedUnit` that :meth:`commit_staged` publishes."""
        check_unit_id(unit)  # before anything is created
        staged = self._staging_path(self.level_dir(level), unit, attempt) + ".parquet"
        self._makedirs(posixpath.dirname(staged))
        return UnitWriter(self.fs, staged, level, unit, level_schema(level))

    def check_schema(self, level: int, unit: str, table: pa.Table) -> None:
        declared = level_schema(level)
        if not table.schema.equals(declared, check_metadata=False):
            raise SchemaMismatch(f"level {level} unit {unit}: {_first_difference(table.schema, declared)}")

    def commit(
        self, level: int, unit: str, table: pa.Table, stats: dict, attempt: int, replace: bool = False
    ) -> bool:
        """Publish ``table`` as (level, unit): staged through a :class:`UnitWriter` (the bytes do
        not depend on how the caller chunked its rows), then :meth:`commit_staged`."""
        self.check_schema(level, unit, table)
        writer = self.stage_writer(level, unit, attempt)
        try:
            writer.write(table)
            staged = writer.close()
        except BaseException:
            writer.abort()
            raise
        return self.commit_staged(staged, stats, attempt, replace)

    def commit_staged(self, staged: StagedUnit, stats: dict, attempt: int, replace: bool = False) -> bool:
        """Publish a staged unit. False when another commit is valid (fenced) or another live
        attempt holds the claim; the staged file is removed either way.

        Order: (staged Parquet), claim (:mod:`grand_pipeline.fencing`), publish Parquet, publish
        marker. A crash before the marker leaves a Parquet without marker, which is not committed
        and is overwritten next time. ``replace`` rewrites a committed unit (retry-failed): the
        old marker is removed before the new Parquet is published.
        """
        level, unit = staged.level, staged.unit
        final, marker = self.parquet_path(level, unit), self.marker_path(level, unit)
        claims = self.claim_dir(level, unit)
        try:
            if not replace and self.is_committed(level, unit):
                logger.info("level %d unit %s already committed; attempt %d discarded", level, unit, attempt)
                return False
            claim = fencing.acquire(
                self.fs, claims, attempt, lambda: self.is_committed(level, unit), self.claim_wait_s,
                replace=replace,
            )
            if claim.state != "own":
                logger.info(
                    "level %d unit %s: %s by attempt %s; attempt %d discarded", level, unit,
                    claim.state, (claim.record or {}).get("attempt"), attempt,
                )
                return False
            if replace:
                self._remove(marker)
            self._publish(staged.path, final)
        finally:
            self._remove(staged.path)

        record = marker_record(level, unit, attempt, stats, staged.counts, staged.size, staged.sha256, claim.generation)
        if not fencing.still_owner(self.fs, claims, claim.generation):
            # Presumed dead (lease expired) and taken over while publishing: the new holder
            # writes the marker. The Parquet bytes are the same whoever published them.
            logger.warning("level %d unit %s: claim taken over; attempt %d leaves the marker", level, unit, attempt)
            return False
        self._write_atomic(marker, json.dumps(record, sort_keys=True, indent=1).encode())
        logger.info(
            "committed level %d unit %s (%d rows, attempt %d)", level, unit, record["rows"], attempt
        )
        return True

    def _parse_marker(self, level: int, unit: str, raw: bytes | None, path: str) -> dict | None:
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
            or data["unit"] != unit
        ):
            logger.warning("ignoring unparseable commit marker %s", path)
            return None
        return data

    def marker(self, level: int, unit: str) -> dict | None:
        path = self.marker_path(level, unit)
        return self._parse_marker(level, unit, self._read_bytes(path), path)

    def is_committed(self, level: int, unit: str) -> bool:
        """Marker parses and the Parquet has the size and sha256 it records (reads the Parquet)."""
        record = self.marker(level, unit)
        if record is None:
            return False
        path = self.parquet_path(level, unit)
        try:
            if self.fs.size(path) != record["parquet_bytes"]:
                return False
        except FileNotFoundError:
            return False
        return self._sha256_of(path) == record["parquet_sha256"]

    def committed(self, level: int, verify: bool = False) -> dict[str, dict]:
        """unit -> marker for every valid commit of ``level``, from one directory listing.

        Without ``verify`` a commit is valid when its marker parses and the listed Parquet has
        the recorded size; hashing every Parquet of a level is left to ``verify=True``.
        """
        directory = self.level_dir(level)
        try:
            entries = self.fs.ls(directory, detail=True)
        except FileNotFoundError:
            return {}
        sizes = {posixpath.basename(e["name"].rstrip("/")): e.get("size") for e in entries}
        names = sorted(n[: -len(MARKER_SUFFIX)] for n in sizes if n.endswith(MARKER_SUFFIX))
        _refuse_old_layout(directory, names)
        units = [n for n in names if UNIT_ID_RE.match(n) and ".." not in n and not n.startswith(".")]
        paths = {u: posixpath.join(directory, u + MARKER_SUFFIX) for u in units}
        blobs = self.fs.cat(list(paths.values()), on_error="omit") if paths else {}
        blobs = {self.fs._strip_protocol(k): v for k, v in blobs.items()}
        out: dict[str, dict] = {}
        for unit, path in paths.items():
            record = self._parse_marker(level, unit, blobs.get(self.fs._strip_protocol(path)), path)
            if record is None or sizes.get(f"{unit}.parquet") != record["parquet_bytes"]:
                continue
            if verify and self._sha256_of(self.parquet_path(level, unit)) != record["parquet_sha256"]:
                continue
            out[unit] = record
        return out

    def read(self, level: int, unit: str, columns: list[str] | None = None) -> pa.Table:
        """The committed table. The bytes are checked against the marker before they are parsed."""
        record = self.marker(level, unit)
        data = self._read_bytes(self.parquet_path(level, unit)) if record else None
        if (
            record is None
            or data is None
            or len(data) != record["parquet_bytes"]
            or hashlib.sha256(data).hexdigest() != record["parquet_sha256"]
        ):
            raise NotCommitted(f"level {level} unit {unit} is not committed in {self.uri}")
        # use_threads=False: with pyarrow 26, a threaded Parquet read leaves pool threads that
        # abort the interpreter at exit now and then ("terminate called without an active
        # exception"). One unit is decoded per call; parallelism comes from running shards.
        return pq.read_table(pa.BufferReader(data), columns=columns, use_threads=False)

    def iter_batches(
        self, level: int, unit: str, columns: list[str] | None = None, batch_size: int = ROW_GROUP_ROWS
    ) -> Iterator[pa.RecordBatch]:
        """The committed rows a batch at a time, so memory follows ``batch_size``, not the unit.

        The file is checked against its marker (size and a streamed sha256) before it is parsed.
        """
        if not self.is_committed(level, unit):
            raise NotCommitted(f"level {level} unit {unit} is not committed in {self.uri}")
        with self.fs.open(self.parquet_path(level, unit), "rb") as handle:
            parquet = pq.ParquetFile(handle)
            yield from parquet.iter_batches(batch_size=batch_size, columns=columns, use_threads=False)

    def clear(self, level: int, unit: str) -> None:
        # Marker first: once it is gone the unit is uncommitted, whatever happens to the rest.
        self._remove(self.marker_path(level, unit))
        self._remove(self.parquet_path(level, unit))

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

    def clear_shard(self, level: int, shard: str) -> None:
        """Uncommit every unit of ``shard`` at ``level`` (``--mode overwrite``)."""
        prefix = f"{check_shard_id(shard)}@"
        for unit in self.committed(level):
            if unit.startswith(prefix):
                self.clear(level, unit)

    # ---- shard indexes (the split into units) -------------------------------------------------
    def read_index(self, shard: str) -> ShardIndex | None:
        """The stored index of ``shard``, or None before its first Level-1 run."""
        doc = self._read_json(self._path(RUN_DIR, UNITS_DIR, f"{check_shard_id(shard)}.json"))
        if doc is None:
            return None
        try:
            return ShardIndex.from_doc(doc, shard)
        except UnitError as exc:
            raise StoreError(str(exc)) from None

    def write_index(self, index: ShardIndex) -> None:
        path = self._path(RUN_DIR, UNITS_DIR, f"{check_shard_id(index.shard_id)}.json")
        self._write_atomic(path, json.dumps(index.to_doc(), sort_keys=True).encode())
        self.record_units(index.shard_id, index.num_units)

    def drop_index(self, shard: str) -> None:
        self._remove(self._path(RUN_DIR, UNITS_DIR, f"{check_shard_id(shard)}.json"))

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
            return {"shards": [], "by_level": {}, "units": {}}
        return {
            "shards": list(data.get("shards", [])),
            "by_level": dict(data.get("by_level", {})),
            "units": dict(data.get("units", {})),
        }

    def record_shards(self, level: int | None, shard_ids: list[str]) -> None:
        """Add ``shard_ids`` to the run's known input shards (and to ``level``'s, if given)."""
        ids = {check_shard_id(s) for s in shard_ids}
        doc = self._shards_doc()
        doc["shards"] = sorted(set(doc["shards"]) | ids)
        if level is not None:
            key = str(_check_level(level))
            doc["by_level"][key] = sorted(set(doc["by_level"].get(key, [])) | ids)
        self._write_atomic(self._run_path("shards.json"), json.dumps(doc, sort_keys=True, indent=1).encode())

    def record_units(self, shard: str, count: int) -> None:
        """Remember how many units ``shard`` has (``status`` reads counts, never whole indexes)."""
        doc = self._shards_doc()
        doc["units"][check_shard_id(shard)] = int(count)
        self._write_atomic(self._run_path("shards.json"), json.dumps(doc, sort_keys=True, indent=1).encode())

    def unit_counts(self) -> dict[str, int]:
        return dict(self._shards_doc()["units"])

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
        """JSON-ready progress summary. Matrix keys are level numbers as strings (JSON keys).

        Progress is counted in units (the unit of commit); a shard whose index is not stored yet
        counts as one unit. ``matrix`` is per shard: committed (every unit), partial or missing.
        """
        known = self.known_shards()
        unit_counts = self.unit_counts()
        wanted = sorted(set(levels or []) | set(self.levels_present()))
        summaries, per_shard = [], {}
        for level in wanted:
            markers = self.committed(level)
            if not markers and level not in (levels or []):
                continue
            done: dict[str, int] = {}
            for unit in markers:
                shard = split_unit_id(unit)[0]
                done[shard] = done.get(shard, 0) + 1
            shards = set(self.known_shards(level)) | set(done)
            rows = sum(m["rows"] for m in markers.values())
            seconds = sum(float(m.get("seconds") or 0.0) for m in markers.values())
            by_stage: dict[str, int] = {}
            for m in markers.values():
                for stage, n in (m.get("failures_by_stage") or {}).items():
                    by_stage[stage] = by_stage.get(stage, 0) + int(n)
            totals = {shard: max(unit_counts.get(shard, 1), done.get(shard, 0)) for shard in shards}
            summaries.append(
                {
                    "level": level,
                    "units_committed": len(markers),
                    "units_total": sum(totals.values()),
                    "shards_committed": sum(1 for s in shards if done.get(s, 0) >= totals[s]),
                    "shards_total": len(shards),
                    "images_ok": sum(int(m.get("ok", 0)) for m in markers.values()),
                    "images_failed": sum(int(m.get("failed", 0)) for m in markers.values()),
                    "failures_by_stage": dict(sorted(by_stage.items())),
                    "seconds": seconds,
                    "images_per_second": rows / seconds if seconds > 0 else 0.0,
                }
            )
            per_shard[level] = (done, totals)
        all_shards = sorted(set(known).union(*(set(t) for _, t in per_shard.values())))
        matrix = {
            shard: {str(lv): _shard_state(done.get(shard, 0), totals.get(shard, 1)) for lv, (done, totals) in per_shard.items()}
            for shard in all_shards
        }
        return {"shards": known, "levels": summaries, "matrix": matrix}


def _ancestors(path: str) -> list[str]:
    """``path`` and every folder above it, nearest first."""
    out = [path]
    while (parent := os.path.dirname(out[-1])) != out[-1]:
        out.append(parent)
    return out


def _shard_state(done: int, total: int) -> str:
    return "committed" if done >= total else ("partial" if done else "missing")
