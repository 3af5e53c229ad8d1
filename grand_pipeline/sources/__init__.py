"""Input readers: discover shards in an input URI and stream their images.

Inputs are SA-1B tar shards (a single tar, or a directory of tars) or a flat folder of
images, on any filesystem fsspec knows (local, ``s3://``, ``gs://``, ``memory://``).
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Callable, Collection, Iterator
from pathlib import PurePosixPath

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .base import (
    IMAGE_SUFFIXES,
    SHARD_ID_RE,
    ImageDecodeError,
    ShardRef,
    SourceError,
    SourceImage,
    UnsafeIdError,
    decode_image,
    safe_id,
)
from .folder import folder_image_id, iter_image_folder
from .sa1b import index_sa1b_tar, iter_sa1b_tar, write_sa1b_tar

__all__ = [
    "SHARD_ID_RE",
    "ImageDecodeError",
    "ShardRef",
    "SourceError",
    "SourceImage",
    "UnsafeIdError",
    "decode_image",
    "iter_image_folder",
    "iter_sa1b_tar",
    "index_shard",
    "iter_shard",
    "iter_unit_items",
    "list_shards",
    "read_images",
    "safe_id",
    "write_sa1b_tar",
]

logger = logging.getLogger(__name__)

_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")  # longest first: "x.tar.gz" -> "x"

Reader = Callable[[ShardRef, Collection[str] | None, int], Iterator[SourceImage]]
Indexer = Callable[[ShardRef], tuple[list[str], list[int] | None]]
# A registry rather than if/elif, so a new input kind is one entry here: its reader and its
# indexer (image ids in reader order, and byte offsets where a unit can seek to its first image).
_READERS: dict[str, Reader] = {
    "sa1b_tar": iter_sa1b_tar,
    "image_folder": iter_image_folder,
}
_INDEXERS: dict[str, Indexer] = {
    "sa1b_tar": index_sa1b_tar,
    "image_folder": lambda ref: ([folder_image_id(uri) for uri in ref.members], None),
}


def _name(path: str) -> str:
    return PurePosixPath(path.rstrip("/")).name


def _tar_stem(name: str) -> str | None:
    lower = name.lower()
    for suffix in _TAR_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def _unique(refs_or_ids: list[tuple[str, str]], input_uri: str, what: str) -> None:
    """Raise if two inputs map to one id: they would overwrite each other's output."""
    seen: dict[str, str] = {}
    for ident, source in refs_or_ids:
        if ident in seen:
            raise SourceError(
                f"{what} {_name(seen[ident])!r} and {_name(source)!r} in {input_uri} both map to id "
                f"{ident!r}; rename one of them"
            )
        seen[ident] = source


def _link_kind(path: str) -> str | None:
    """None when a local symlink leads to a regular file (read through it: it is the user's input,
    and readers never write), else why it is skipped."""
    if os.path.isfile(path):
        return None
    if os.path.isdir(path):
        return "symlink(s) to a folder (folders are not read recursively)"
    return "broken symlink(s)" if not os.path.exists(path) else "symlink(s) to a non-regular file"


def _folder_files(
    fs: fsspec.AbstractFileSystem, path: str, input_uri: str
) -> tuple[list[str], dict[str, int]]:
    """The files directly in folder ``path``, sorted, symlinks to files included; and how many
    entries of each other kind were skipped (each kind logged as one warning line with a count).

    fsspec's local ``ls`` reports a symlink as type "other" (with ``islink``), whatever it leads
    to, so keeping only type "file" dropped symlinked tars and images without a word.
    """
    files: list[str] = []
    skipped: dict[str, list[str]] = {}
    local = isinstance(fs, LocalFileSystem)
    for entry in sorted(fs.ls(path, detail=True), key=lambda e: e["name"]):  # ls order varies
        name, kind = entry["name"], entry.get("type")
        if _name(name).startswith("."):
            continue  # hidden files (e.g. macOS "._x.tar") are never inputs
        if kind == "file":
            files.append(name)
            continue
        if entry.get("islink") and local:
            why = _link_kind(name)
        elif kind == "directory":
            why = "subfolder(s) (folders are not read recursively)"
        else:
            why = f"special file(s) (type {kind!r})"
        if why is None:
            files.append(name)
        else:
            skipped.setdefault(why, []).append(name)
    for why, names in skipped.items():
        logger.warning("%s: skipped %d %s, e.g. %s", input_uri, len(names), why, _name(names[0]))
    return files, {why: len(names) for why, names in skipped.items()}


def _folder_shards(
    fs: fsspec.AbstractFileSystem, path: str, images: list[str], input_uri: str, folder_chunk: int
) -> list[ShardRef]:
    uris = [fs.unstrip_protocol(p) for p in images]
    _unique([(folder_image_id(u), u) for u in uris], input_uri, "images")
    prefix = safe_id(_name(path), strict=False) if _name(path) else "images"
    return [
        ShardRef(
            f"{prefix}-{k:05d}", fs.unstrip_protocol(path), "image_folder", tuple(uris[i : i + folder_chunk])
        )
        for k, i in enumerate(range(0, len(uris), folder_chunk))
    ]


def list_shards(input_uri: str, shards_glob: str | None = None, folder_chunk: int = 1000) -> list[ShardRef]:
    """Discover the shards of an input, deterministically (sorted by name).

    A tar file is one shard; a directory of tars gives one shard per tar; a directory of
    images (and no tars; not recursive) gives chunks of ``folder_chunk`` images.
    ``shards_glob`` keeps only shard ids matching that fnmatch pattern.
    """
    if folder_chunk < 1:
        raise SourceError(f"folder_chunk must be >= 1, got {folder_chunk}")
    try:
        fs, path = fsspec.core.url_to_fs(input_uri)
        exists = fs.exists(path)
    except (ImportError, ValueError, OSError) as e:  # unknown protocol, missing s3fs, auth
        raise SourceError(f"cannot open input {input_uri}: {e}") from e
    if not exists:
        raise SourceError(f"input {input_uri} does not exist")

    if fs.isfile(path):
        stem = _tar_stem(_name(path))
        if stem is None:
            raise SourceError(f"input {input_uri} is a file but not a tar shard (.tar, .tar.gz, .tgz)")
        refs = [ShardRef(safe_id(stem, strict=False), fs.unstrip_protocol(path), "sa1b_tar")]
    else:
        files, skipped = _folder_files(fs, path, input_uri)
        tars = [(stem, f) for f in files if (stem := _tar_stem(_name(f))) is not None]
        images = [f for f in files if PurePosixPath(f).suffix.lower() in IMAGE_SUFFIXES]
        if tars:
            if images:
                logger.info("%s holds tar shards; ignoring %d loose images", input_uri, len(images))
            ids = [(safe_id(stem, strict=False), f) for stem, f in tars]
            _unique(ids, input_uri, "tar files")
            refs = [ShardRef(i, fs.unstrip_protocol(f), "sa1b_tar") for i, f in ids]
        elif images:
            refs = _folder_shards(fs, path, images, input_uri, folder_chunk)
        else:
            raise SourceError(
                f"no shards in {input_uri}: found no tar files ({', '.join(_TAR_SUFFIXES)}) and no images "
                f"({', '.join(sorted(IMAGE_SUFFIXES))})"
                + "".join(f"; skipped {n} {kind}" for kind, n in skipped.items())
            )

    if shards_glob:
        kept = [r for r in refs if fnmatch.fnmatchcase(r.shard_id, shards_glob)]
        if not kept:
            sample = ", ".join(r.shard_id for r in refs[:5]) + (", ..." if len(refs) > 5 else "")
            raise SourceError(f"no shards in {input_uri} match {shards_glob!r} (found {len(refs)}: {sample})")
        refs = kept
    logger.info("found %d shard(s) in %s", len(refs), input_uri)
    return refs


def iter_shard(ref: ShardRef, only: Collection[str] | None = None, start: int = 0) -> Iterator[SourceImage]:
    """Stream the images of one shard (optionally only the given image ids, from byte ``start``
    where the kind has offsets)."""
    reader = _READERS.get(ref.kind)
    if reader is None:
        raise SourceError(f"unknown shard kind {ref.kind!r}; known kinds: {', '.join(sorted(_READERS))}")
    return reader(ref, only, start)


def index_shard(ref: ShardRef) -> tuple[list[str], list[int] | None]:
    """(image ids in reader order, member offsets or None): what sub-shard units are cut from."""
    indexer = _INDEXERS.get(ref.kind)
    if indexer is None:
        raise SourceError(f"unknown shard kind {ref.kind!r}; known kinds: {', '.join(sorted(_INDEXERS))}")
    return indexer(ref)


def iter_unit_items(ref: ShardRef, image_ids: Collection[str], start: int = 0) -> Iterator[SourceImage]:
    """Stream the items of ``image_ids`` (one unit) in reader order, from byte ``start`` of a tar;
    stops reading as soon as every wanted id was seen, so a unit reads only its own bytes."""
    wanted = set(image_ids)
    if not wanted:
        return
    it = iter_shard(ref, wanted, start)
    seen: set[str] = set()
    try:
        for item in it:
            yield item
            seen.add(item.image_id)
            if len(seen) == len(wanted):
                break
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()  # closes the tar stream now, not at garbage collection


def read_images(ref: ShardRef, image_ids: set[str]) -> dict[str, SourceImage]:
    """Re-read a shard and return the items for ``image_ids`` (ids not found are absent).

    Later levels need the pixels again; reading stops as soon as all ids were found.
    """
    found: dict[str, SourceImage] = {}
    for item in iter_unit_items(ref, image_ids):
        found.setdefault(item.image_id, item)
    return found
