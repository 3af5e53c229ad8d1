"""Streaming reader (and a deterministic writer) for SA-1B tar shards.

An SA-1B shard ``sa_NNNNNN.tar`` holds ``sa_K.jpg`` + ``sa_K.json`` pairs. The tar is
read as a forward-only stream (``r|*``) so it works on non-seekable object-store
streams and never touches local disk: member names are only used to derive ids, never
as paths. Images may also be ``.png``/``.webp``/``.bmp`` (whatever a folder of images may hold),
so a hand-made tar of the same photos reads the same way.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import posixpath
import tarfile
import zlib
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, TypeGuard

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .base import (
    IMAGE_SUFFIXES,
    ShardRef,
    SourceImage,
    UnsafeIdError,
    error_text,
    fallback_id,
    safe_id,
    short_repr,
)

logger = logging.getLogger(__name__)

_JSON_SUFFIX = ".json"
# The width and height columns are int32: a larger JSON size would fail the whole unit's write.
_MAX_SIDE = 2**31 - 1
# Error rows for a duplicate member get ids "{id}__dup{n}": a second row with the kept image's id
# would give two rows one key (retries and later levels join rows by image id).
_DUP_TAG = "__dup"
# SA-1B members are a few MB; a far larger one is corrupt or hostile and is not read
# into memory (it becomes an error row instead).
_MAX_MEMBER_BYTES = 1 << 30
_END_ATTR = "_grand_last_header_error"


class _EndTrackingTarInfo(tarfile.TarInfo):
    """Records why tarfile stopped reading headers.

    ``TarFile.next()`` silently treats a stream that ends inside or right before a
    header as a normal end of archive. Only a zero block (``EOFHeaderError``) is a real
    end marker, so remembering the last header error tells a complete tar from a
    truncated one.
    """

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> _EndTrackingTarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as e:
            setattr(tarfile_, _END_ATTR, e)
            raise


@dataclass
class _Half:
    """One member of a jpg/json pair, or the reason it could not be read."""

    name: str
    data: bytes | None
    error: str | None = None


@dataclass
class _Pending:
    stem: str  # the member stem as found (for messages)
    image: _Half | None = None
    meta: _Half | None = None
    unsafe: bool = False
    offset: int = -1  # byte offset of the first member's header; -1 when not seekable


def _split_member(name: str) -> tuple[str, str, str]:
    """(basename, stem, lower-case suffix) of a member name, ignoring any directories."""
    base = PurePosixPath(name.replace("\\", "/")).name
    p = PurePosixPath(base)
    return base, p.stem, p.suffix.lower()


def _member_key(name: str, stem: str, suffix: str) -> tuple[str, str, bool]:
    """(image id, stem for messages, unsafe) of a member. Plain directories (``./``, ``x/``) are
    ignored, but a name that climbs out (``../``) or is absolute is unsafe: its basename could
    otherwise merge it into a real image's pair, so it keeps its own id and becomes an error row.
    The id of an unsafe member hashes its whole name minus the suffix, so its jpg/json still pair."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or ".." in PurePosixPath(posix).parts:
        full = posix[: len(posix) - len(suffix)] if suffix else posix
        return fallback_id(full), full, True
    try:
        return safe_id(stem), stem, False
    except UnsafeIdError:
        return fallback_id(stem), stem, True


def _is_pos_int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _parse_meta(raw: bytes) -> tuple[list[dict], int, int]:
    """Validate an SA-1B JSON; raises ValueError with a short reason."""
    try:
        doc = json.loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(doc, dict):
        raise ValueError("top level is not an object")
    image, anns = doc.get("image"), doc.get("annotations")
    if not isinstance(image, dict):
        raise ValueError("missing 'image' object")
    if not isinstance(anns, list) or not all(isinstance(a, dict) for a in anns):
        raise ValueError("missing 'annotations' list")
    w, h = image.get("width"), image.get("height")
    if not (_is_pos_int(w) and _is_pos_int(h) and w <= _MAX_SIDE and h <= _MAX_SIDE):
        raise ValueError(
            f"image.width/height are not positive integers below 2**31: {short_repr(w)} x {short_repr(h)}"
        )
    return anns, w, h


def _build(key: str, shard_id: str, p: _Pending) -> SourceImage:
    file_name = p.image.name if p.image else f"{p.stem}.jpg"
    data = p.image.data if p.image else None
    item = SourceImage(key, shard_id, file_name, data, None, None, None)
    errors: list[str] = []
    if p.unsafe:
        errors.append(f"unsafe member name {short_repr(p.stem, 120)}")
    if p.image is None:
        errors.append(f"missing image for {p.stem}")
    elif p.image.error:
        errors.append(p.image.error)
    if p.meta is None:
        errors.append(f"missing SA-1B json for {p.stem}")
    elif p.meta.error:
        errors.append(p.meta.error)
    elif p.meta.data is not None:
        try:
            item.annotations, item.width, item.height = _parse_meta(p.meta.data)
        except ValueError as e:  # includes JSONDecodeError and UnicodeDecodeError
            errors.append(f"bad SA-1B json: {str(e)[:200]}")
    item.error = "; ".join(errors) or None
    return item


def _read_half(tf: tarfile.TarFile, member: tarfile.TarInfo, base: str) -> _Half:
    if member.size > _MAX_MEMBER_BYTES:
        return _Half(base, None, f"member {base} too large ({member.size} bytes)")
    fh = tf.extractfile(member)
    if fh is None:  # cannot happen for regular files; kept so a None never leaks out
        return _Half(base, None, f"member {base} has no data")
    return _Half(base, fh.read())  # a short read raises tarfile.ReadError (truncation)


def _duplicate(key: str, member: str, slot: str, shard_id: str, taken: set[str]) -> SourceImage:
    """The error item of a member whose id already has that half: the first one is kept (the
    order of a tar is fixed, so that choice is deterministic) and this one is reported under its
    own id, ``{key}__dup{n}``, the first n not taken by any id of the shard so far."""
    n = 1
    while f"{key}{_DUP_TAG}{n}" in taken:
        n += 1
    dup_id = f"{key}{_DUP_TAG}{n}"
    taken.add(dup_id)
    what = "an image" if slot == "image" else "a json"
    error = f"duplicate member {short_repr(member, 120)}: {key} already has {what}; the first one is kept"
    base, _, _ = _split_member(member)
    return SourceImage(dup_id, shard_id, base, None, None, None, None, error)


def iter_sa1b_tar(
    ref: ShardRef, only: Collection[str] | None = None, start: int = 0
) -> Iterator[SourceImage]:
    """Yield one :class:`SourceImage` per image of an SA-1B tar, in pair-completion order.

    ``only`` restricts the output to those image ids (their bytes are the only ones
    read). ``start`` is the byte offset of a member header of an uncompressed tar (from
    :func:`index_sa1b_tar`): a sub-shard unit seeks there instead of reading the bytes before it.
    Broken input never raises: it becomes items with ``error`` set, and a tar that ends
    early adds one ``{shard_id}__truncated`` item. A second member for a half an id already has
    is an error item ``{id}__dup{n}`` (the first is kept); a name that climbs out of the tar
    (``../``, absolute) is an error item of its own, never merged with the image of its basename.
    """
    for item, _ in _scan(ref, only, start, read_data=True, info={}):
        yield item


def index_sa1b_tar(ref: ShardRef) -> tuple[list[str], list[int] | None]:
    """The image ids of a tar in the order :func:`iter_sa1b_tar` yields them, and the byte offset
    of each item's first member header (None for a compressed tar, which cannot be entered
    mid-way). Reads headers only: member data is skipped, never kept."""
    ids: list[str] = []
    offsets: list[int] = []
    info: dict[str, Any] = {}
    for item, offset in _scan(ref, None, 0, read_data=False, info=info):
        ids.append(item.image_id)
        offsets.append(offset)
    return ids, (offsets if info.get("plain", False) else None)


def _scan(
    ref: ShardRef, only: Collection[str] | None, start: int, read_data: bool, info: dict[str, Any]
) -> Iterator[tuple[SourceImage, int]]:
    """The pairing loop shared by reading and indexing: (item, offset of its first member), -1
    where there is none to seek to. ``info["plain"]`` tells whether the tar is uncompressed."""
    pending: dict[str, _Pending] = {}  # insertion order = first-seen order
    halves: set[tuple[str, str]] = set()  # (image id, "image"/"meta") already met
    taken: set[str] = set()  # every id handed out so far, real or generated for a duplicate
    dup_ids: set[str] = set()  # the generated ones: a real member with such a name is a duplicate too
    n_members = 0
    failure: str | None = None
    plain = True  # uncompressed: member offsets are file offsets
    try:
        with fsspec.open(ref.uri, "rb") as f:
            if start:
                f.seek(start)
            # "r|" (not "r|*") after a seek: compression is only detected at the start of a file.
            with tarfile.open(fileobj=f, mode="r|" if start else "r|*", tarinfo=_EndTrackingTarInfo) as tf:
                plain = info["plain"] = getattr(tf.fileobj, "comptype", "tar") == "tar"
                while (member := tf.next()) is not None:
                    n_members += 1
                    tf.members.clear()  # type: ignore[attr-defined]  # stream mode keeps every header
                    if not member.isreg():
                        logger.debug("%s: skipping non-regular member %r", ref.shard_id, member.name)
                        continue
                    base, stem, suffix = _split_member(member.name)
                    if (suffix not in IMAGE_SUFFIXES and suffix != _JSON_SUFFIX) or stem.startswith("."):
                        logger.debug("%s: skipping unrelated member %r", ref.shard_id, member.name)
                        continue
                    key, shown, unsafe = _member_key(member.name, stem, suffix)
                    slot = "meta" if suffix == _JSON_SUFFIX else "image"
                    # Bookkeeping covers every member, wanted or not, so a unit that reads from the
                    # top names duplicates exactly as the index did.
                    if (key, slot) in halves or key in dup_ids:
                        logger.warning("%s: duplicate member %r: an error row", ref.shard_id, member.name)
                        dup = _duplicate(key, member.name, slot, ref.shard_id, taken)
                        dup_ids.add(dup.image_id)
                        if only is None or dup.image_id in only:
                            yield dup, -1  # read from the top: its id depends on what came before
                        continue
                    halves.add((key, slot))
                    taken.add(key)
                    if only is not None and key not in only:
                        continue
                    offset = start + member.offset if plain else -1
                    p = pending.get(key) or _Pending(shown, unsafe=unsafe, offset=offset)
                    try:
                        half = _read_half(tf, member, base) if read_data else _Half(base, None)
                        setattr(p, slot, half)
                    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
                        # Keep the id visible as its own error row, then end the stream below.
                        setattr(p, slot, _Half(base, None, f"member {base} unreadable: {error_text(e)}"))
                        pending[key] = p
                        raise
                    pending[key] = p
                    if p.image is not None and p.meta is not None:
                        del pending[key]
                        yield _build(key, ref.shard_id, p), p.offset
                end = getattr(tf, _END_ATTR, None)
                if not isinstance(end, tarfile.EOFHeaderError):  # type: ignore[attr-defined]
                    failure = f"no end-of-archive marker ({end or 'stream ended'})"
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        failure = f"{type(e).__name__}: {error_text(e)}"

    # Half pairs: their partner never arrived (or the stream broke before it did).
    for key, p in pending.items():
        yield _build(key, ref.shard_id, p), p.offset
    if failure is not None:
        msg = f"truncated tar after {n_members} members: {failure}"
        logger.warning("%s (%s): %s", ref.shard_id, ref.uri, msg)
        trunc_id = f"{ref.shard_id}__truncated"
        if only is None or trunc_id in only:
            # No member to seek to: -1 makes the unit that holds it read from the start.
            yield SourceImage(trunc_id, ref.shard_id, "", None, None, None, None, error=msg), -1


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata so the same items always give byte-identical tars.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def write_sa1b_tar(path_or_uri: str, items: list[tuple[str, bytes, dict[str, Any]]]) -> None:
    """Write an SA-1B-format tar: for each (stem, jpeg bytes, json dict) in the given
    order, ``{stem}.jpg`` then ``{stem}.json``. Deterministic; ``.tar.gz``/``.tgz``
    destinations are gzip-compressed (with a zero gzip timestamp)."""
    seen: set[str] = set()
    for stem, _, _ in items:
        if safe_id(stem) != stem or stem in seen:
            raise ValueError(f"invalid or duplicate stem {stem!r}")
        seen.add(stem)
    fs, path = fsspec.core.url_to_fs(path_or_uri)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
    compress = path.lower().endswith((".tar.gz", ".tgz"))
    with fs.open(path, "wb") as raw:
        # gzip's header embeds a timestamp and file name: pin both for reproducibility.
        out = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if compress else raw
        try:
            with tarfile.open(fileobj=out, mode="w|", format=tarfile.USTAR_FORMAT) as tf:
                for stem, jpeg, meta in items:
                    blob = json.dumps(meta, separators=(",", ":")).encode("utf-8")
                    tf.addfile(_tar_info(f"{stem}.jpg", len(jpeg)), io.BytesIO(jpeg))
                    tf.addfile(_tar_info(f"{stem}.json", len(blob)), io.BytesIO(blob))
        finally:
            if compress:
                out.close()
    logger.debug("wrote %d SA-1B items to %s", len(items), path_or_uri)
