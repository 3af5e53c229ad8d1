"""Reader for a plain folder of images (no masks): one shard = one sorted chunk of files."""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator
from pathlib import PurePosixPath

import fsspec

from .base import ShardRef, SourceImage, error_text, safe_id

logger = logging.getLogger(__name__)


def folder_image_id(uri: str) -> str:
    """Image id of a folder file: its stem, sanitized (user file names may hold spaces etc.)."""
    return safe_id(PurePosixPath(uri.rstrip("/")).stem, strict=False)


def iter_image_folder(
    ref: ShardRef, only: Collection[str] | None = None, start: int = 0
) -> Iterator[SourceImage]:
    """Yield each member file of the chunk with its raw bytes (``start`` is unused: files are
    opened one by one, so there is nothing to seek past).

    ``annotations`` is None (no masks) and width/height stay None: they are only known
    once the pixels are decoded. A file that cannot be read becomes an error item.
    """
    for uri in ref.members:
        image_id = folder_image_id(uri)
        if only is not None and image_id not in only:
            continue
        file_name = PurePosixPath(uri.rstrip("/")).name
        try:
            with fsspec.open(uri, "rb") as f:
                data = f.read()
        except OSError as e:  # FileNotFoundError, PermissionError, network errors
            logger.warning("%s: cannot read %s: %s", ref.shard_id, uri, e)
            yield SourceImage(
                image_id,
                ref.shard_id,
                file_name,
                None,
                None,
                None,
                None,
                error=f"unreadable image file {file_name}: {type(e).__name__}: {error_text(e)}",
            )
            continue
        yield SourceImage(image_id, ref.shard_id, file_name, data, None, None, None)
