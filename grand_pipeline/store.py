"""Output store: the layout of an output, its paths, and verified reads of committed units.

Layout under ``OUT`` (a local path or any fsspec URI)::

    OUT/_run/...                          run metadata and shard indexes (:mod:`grand_pipeline.run_meta`)
    OUT/level{N}/{unit}.parquet           unit = {shard}@{k:05d} (:mod:`grand_pipeline.units`)
    OUT/level{N}/{unit}.success.json      commit marker, written LAST (:mod:`grand_pipeline.markers`)
    OUT/level{N}/_claims/{unit}/{g:06d}.json    commit claims, created exclusively (the commit log)
    OUT/level{N}/_staging/...             temporary files of in-flight (or killed) commits

The unit of commit is a sub-shard unit of at most ``engine.unit_images`` images. Outputs written
before units (``level{N}/{shard}.parquet``) are refused with one line (:class:`OldLayout`).

A (level, unit) is done only when its marker parses and the Parquet next to it has the size and
sha256 the marker records; :mod:`grand_pipeline.commit` writes them in that order. Every write
goes to a staging name first and is then published (:mod:`grand_pipeline.publish`).

The store knows schemas and file systems only: it never imports models, levels, Ray or the CLI.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import re
import uuid
from collections.abc import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from grand_pipeline import fencing
from grand_pipeline.publish import publish, put_atomic, remove_quietly
from grand_pipeline.unit_writer import ROW_GROUP_ROWS
from grand_pipeline.units import UNIT_ID_RE, UnitError, split_unit_id

logger = logging.getLogger(__name__)

MARKER_SUFFIX = ".success.json"
STAGING = "_staging"
RUN_DIR = "_run"
_SHARD_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_LEVEL_DIR_RE = re.compile(r"^level(\d+)$")
_MARKER_REQUIRED = ("level", "unit", "attempt", "rows", "parquet_bytes", "parquet_sha256")


class StoreError(Exception):
    """A problem with the output store (bad shard id, unreadable layout, ...)."""


class SchemaMismatch(StoreError):
    """A table handed to :func:`~grand_pipeline.commit.commit` does not match its level's declared schema."""


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


def check_level(level: int) -> int:
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


class Store:
    """Output store rooted at ``uri``; the fs and root path come from ``fsspec.core.url_to_fs``."""

    def __init__(self, uri: str, claim_wait_s: float = 120.0):
        self.uri = str(uri)
        # Other attempts write here too: a cached listing would hide their claims and markers.
        local = fsspec.utils.get_protocol(self.uri) in ("file", "local")
        self.fs, root = fsspec.core.url_to_fs(self.uri, **({} if local else {"use_listings_cache": False}))
        self.root = root.rstrip("/") or "/"
        self._made: set[str] = set()
        #: This process's attempt, once ``RunMeta.next_attempt`` took one (tags staging files).
        self.attempt = 0
        #: How long a commit waits for another live attempt that holds the claim.
        self.claim_wait_s = claim_wait_s

    # ---- paths -------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def level_dir(self, level: int) -> str:
        return self.path(f"level{check_level(level)}")

    def parquet_path(self, level: int, unit: str) -> str:
        return posixpath.join(self.level_dir(level), f"{check_unit_id(unit)}.parquet")

    def marker_path(self, level: int, unit: str) -> str:
        return posixpath.join(self.level_dir(level), f"{check_unit_id(unit)}{MARKER_SUFFIX}")

    def staging_path(self, directory: str, name: str, attempt: int | None = None) -> str:
        """A fresh staging name for ``name`` under ``directory`` (its folder is made). The
        attempt tag lets :func:`~grand_pipeline.commit.clear_staging` spare live attempts' files."""
        tag = self.attempt if attempt is None else attempt
        staged = posixpath.join(directory, STAGING, f"{name}.a{tag}.{uuid.uuid4().hex}")
        self._makedirs(posixpath.dirname(staged))
        return staged

    def claim_dir(self, level: int, unit: str) -> str:
        return fencing.claim_dir(self.level_dir(level), check_unit_id(unit))

    # ---- low-level IO ------------------------------------------------------------------------
    def _makedirs(self, directory: str) -> None:
        # Object stores have no directories; local ones need them. Remember what exists already.
        if directory not in self._made:
            self.fs.makedirs(directory, exist_ok=True)
            self._made.add(directory)

    def publish(self, src: str, dst: str) -> None:
        """Make ``src`` visible as ``dst``, overwriting it (:func:`grand_pipeline.publish.publish`)."""
        self._makedirs(posixpath.dirname(dst))
        publish(self.fs, src, dst)

    def write_atomic(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path``, staged then published: readers see all of it or none."""
        staged = self.staging_path(posixpath.dirname(path), posixpath.basename(path))
        put_atomic(self.fs, staged, path, data, self.publish)

    def remove(self, path: str) -> None:
        remove_quietly(self.fs, path)

    def read_file(self, *parts: str) -> bytes | None:
        """The bytes of ``OUT/<parts>`` (e.g. ``glamm/train_log.jsonl``), or None when absent."""
        return self.read_bytes(self.path(*parts))

    def read_bytes(self, path: str) -> bytes | None:
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

    # ---- committed units ---------------------------------------------------------------------
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
        return self._parse_marker(level, unit, self.read_bytes(path), path)

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
        data = self.read_bytes(self.parquet_path(level, unit)) if record else None
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
        self.remove(self.marker_path(level, unit))
        self.remove(self.parquet_path(level, unit))

    def clear_shard(self, level: int, shard: str) -> None:
        """Uncommit every unit of ``shard`` at ``level`` (``--mode overwrite``)."""
        prefix = f"{check_shard_id(shard)}@"
        for unit in self.committed(level):
            if unit.startswith(prefix):
                self.clear(level, unit)

    def levels_present(self) -> list[int]:
        try:
            names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for n in names if (m := _LEVEL_DIR_RE.match(n)))

