"""Shared types and helpers for the input readers (SA-1B tars, image folders).

The readers never raise for a broken *item*: they yield a :class:`SourceImage` with
``error`` set, so the pipeline writes an error row and nothing is silently lost. Only
problems a user causes before any work starts (a bad input path, no shards) raise
:class:`SourceError`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

logger = logging.getLogger(__name__)

ShardKind = Literal["sa1b_tar", "image_folder"]

# Ids end up in output file names (``level{N}/{shard}.parquet``) and Parquet keys, so
# they are restricted to a conservative character set.
SHARD_ID_RE = r"^[A-Za-z0-9_.-]+$"
_ID_RE = re.compile(SHARD_ID_RE)
_MAX_ID_LEN = 200
_BAD_CHARS_RE = re.compile(r"[^A-Za-z0-9_.-]+")
# PIL names the stream in some messages ("cannot identify image file <_io.BytesIO object at
# 0x7f...>"): the address changes every run, and error text is stored in the output, so two
# identical runs would write different Parquet bytes. Such reprs are cut from every message.
_OBJECT_REPR_RE = re.compile(r"\s*<[^<>]*? at 0x[0-9A-Fa-f]+>")
_MAX_REASON_CHARS = 200

#: File suffixes read as images, by the folder reader and inside SA-1B tars alike (what a folder
#: of images accepts, a hand-made tar of the same images accepts too).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})


class SourceError(Exception):
    """A problem the user caused (bad input path, nothing to read). One clear line."""


class ImageDecodeError(ValueError):
    """Image bytes that cannot (or must not) be decoded: corrupt, truncated, too large."""


class UnsafeIdError(ValueError):
    """A name that cannot be used as an image or shard id."""


@dataclass
class ShardRef:
    shard_id: str
    uri: str
    kind: ShardKind
    # For image folders: the image file URIs of this chunk, sorted. Empty for tars.
    members: tuple[str, ...] = ()


@dataclass
class SourceImage:
    image_id: str
    shard_id: str
    file_name: str
    data: bytes | None
    annotations: list[dict] | None
    width: int | None
    height: int | None
    error: str | None = None


def safe_id(name: str, *, strict: bool = True) -> str:
    """Turn a member/file stem into an id that is safe in file names and keys.

    ``name`` may still carry directories (``../../x``): only the last path component is
    kept. ``strict=True`` (tar members: SA-1B names are always ``sa_K``) raises
    :class:`UnsafeIdError` for anything outside :data:`SHARD_ID_RE`. ``strict=False``
    (user folders, user tar names) replaces bad characters with ``_`` and appends a short
    hash of the original, so ids stay deterministic and two different names never
    collapse onto the same id.
    """
    base = PurePosixPath(name.replace("\\", "/")).name if name else ""
    if base and _ID_RE.match(base) and not base.startswith(".") and len(base) <= _MAX_ID_LEN:
        return base
    if strict:
        raise UnsafeIdError(f"unsafe id {name!r}: must match {SHARD_ID_RE} and not start with '.'")
    digest = hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    cleaned = _BAD_CHARS_RE.sub("_", base).lstrip(".")[: _MAX_ID_LEN - 9].strip("_")
    return f"{cleaned}-{digest}" if cleaned else f"id-{digest}"


def fallback_id(name: str) -> str:
    """Deterministic id for an item whose own name is unusable, so its error row has a key."""
    return "unsafe-" + hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def short_repr(value: object, limit: int = 40) -> str:
    """``repr`` cut to ``limit`` characters: hostile values (a 400-digit number, a megabyte
    string) must not blow up an error message."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**limit:
        return f"<integer with more than {limit} digits>"  # repr alone may refuse > 4300 digits
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_text(exc: BaseException) -> str:
    """An exception's message without object addresses, bounded in length: deterministic."""
    text = _OBJECT_REPR_RE.sub("", str(exc)).strip() or type(exc).__name__
    return text[:_MAX_REASON_CHARS]


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit/float grayscale: PIL's convert("RGB") clips instead of scaling.
        arr = np.asarray(img, dtype=np.float64)
        hi = float(arr.max()) if arr.size else 0.0
        arr = np.clip(arr / hi * 255.0, 0, 255) if hi > 0 else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        # Composite transparency onto white rather than exposing undefined RGB under alpha=0.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode image bytes to an RGB uint8 array of shape (H, W, 3).

    EXIF orientation is deliberately NOT applied: SA-1B masks, boxes and the JSON
    width/height refer to the pixels as stored, so transposing would misalign every
    annotation.

    Raises :class:`ImageDecodeError` for corrupt/truncated data and for images with more
    than ``max_pixels`` pixels; the size check uses the header only, before any decode.
    """
    # Another library may have flipped this process-wide switch; with it on, PIL pads a
    # truncated JPEG with grey and reports success, which would produce silent garbage.
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        logger.warning("PIL ImageFile.LOAD_TRUNCATED_IMAGES was True; resetting it to False")
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        # Image.open only parses the header. PIL's own bomb guard (Image.MAX_IMAGE_PIXELS)
        # may already fire here; it is mapped to ImageDecodeError below.
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"image too large: {error_text(e)}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"not a readable image: {error_text(e)}") from e
    with img:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ImageDecodeError(f"invalid image size {width}x{height}")
        if width * height > max_pixels:
            raise ImageDecodeError(f"image too large: {width}x{height} > max_pixels={max_pixels}")
        try:
            img.load()  # force the full decode now so truncation surfaces here
            rgb = _to_rgb(img)
            # A writable copy, detached from PIL. np.asarray reads PIL's array interface in one
            # piece; np.array(rgb, dtype=...) took 10x longer (the whole decode's cost again).
            arr = np.asarray(rgb).astype(np.uint8, copy=True)
        except Image.DecompressionBombError as e:
            raise ImageDecodeError(f"image too large: {error_text(e)}") from e
        except (OSError, SyntaxError, ValueError, MemoryError) as e:
            raise ImageDecodeError(f"corrupt image data: {error_text(e)}") from e
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageDecodeError(f"unexpected decoded shape {arr.shape}")
    return arr
