"""Pixels for training samples, streamed from the source shards a run was made from.

The input URI is the run's (``_run/run.json`` ``input``) unless an override is given (``--images``:
the same shards moved elsewhere). Wanted images are grouped by source shard and each shard is
read in **one** forward pass (``sources.iter_shard(ref, only=ids)``): tars are streamed, never
extracted, and pixels are yielded as they arrive, so memory holds one image at a time.

Every image that cannot be used is a counted skip (``images:<reason>``), never an exception:
``shard_missing`` (the shard is not under the input any more), ``missing`` (not in its shard),
``unreadable`` (the reader reported an error and gave no bytes), ``decode_error``, and
``size_mismatch``: a decoded size other than the row's ``width x height`` means the masks and
boxes were made on other pixels, so the sample is dropped, never resized to fit.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator

import numpy as np

from grand_pipeline.run_meta import RunMeta
from grand_pipeline.sources import ShardRef, iter_shard, list_shards
from grand_pipeline.sources.base import ImageDecodeError, decode_image
from grand_pipeline.store import Store, StoreError
from grand_pipeline.training.data.samples import ImageRef

logger = logging.getLogger(__name__)

#: Larger than any SA-1B image (about 3.4 MP) by far; a bigger one is corrupt or hostile.
DEFAULT_MAX_PIXELS = 1 << 28


def input_uri(store: Store, override: str | None = None) -> str:
    """``override`` if given, else the run's recorded input; a user error if neither exists."""
    if override:
        return override
    meta = RunMeta(store).read_run_meta() or {}
    if not meta.get("input"):
        raise StoreError(
            f"{store.uri} has no _run/run.json naming its input: pass the images' location (--images)"
        )
    return str(meta["input"])


class ImageSource:
    """The shards of one input URI, listed once, and one-pass pixel reads from them."""

    def __init__(self, uri: str, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.uri = uri
        self.max_pixels = max_pixels
        self._refs: dict[str, ShardRef] | None = None

    @property
    def refs(self) -> dict[str, ShardRef]:
        """shard id -> ``ShardRef`` (listed on first use, so a Dataset worker lists it itself)."""
        if self._refs is None:
            self._refs = {ref.shard_id: ref for ref in list_shards(self.uri)}
        return self._refs

    def iter_images(
        self, wanted: Iterable[ImageRef], counts: Counter, start: int = 0
    ) -> Iterator[tuple[ImageRef, np.ndarray]]:
        """Yield ``(ref, H x W x 3 uint8 pixels)`` for each usable wanted image, shard by shard in
        first-wanted order, images in each shard's stored order; the rest are counted. ``start``:
        the byte offset of the unit the images belong to (see ``units.ShardIndex.start_of``)."""
        for ref, pixels, _ in self.iter_encoded(wanted, counts, start):
            yield ref, pixels

    def iter_encoded(
        self, wanted: Iterable[ImageRef], counts: Counter, start: int = 0
    ) -> Iterator[tuple[ImageRef, np.ndarray, bytes]]:
        """:meth:`iter_images` plus each image's source bytes (an export copies a JPEG as it is)."""
        by_shard: dict[str, dict[str, ImageRef]] = defaultdict(dict)
        for ref in wanted:
            by_shard[ref.shard_id].setdefault(ref.image_id, ref)
        for shard_id, refs in by_shard.items():
            shard = self.refs.get(shard_id)
            if shard is None:
                logger.warning("shard %s is not under %s: %d image(s) skipped", shard_id, self.uri, len(refs))
                counts["images:shard_missing"] += len(refs)
                continue
            yield from self._shard_pass(shard, refs, counts, start)

    def _shard_pass(
        self, shard: ShardRef, refs: dict[str, ImageRef], counts: Counter, start: int = 0
    ) -> Iterator[tuple[ImageRef, np.ndarray, bytes]]:
        seen: set[str] = set()
        items = iter_shard(shard, only=set(refs), start=start)
        try:
            for item in items:
                ref = refs.get(item.image_id)
                if ref is None or item.image_id in seen:
                    continue  # a reader's error item (e.g. a truncated tar) or a repeated member
                seen.add(item.image_id)
                pixels = self._decode(item.data, item.error, ref, counts)
                if pixels is not None and item.data is not None:
                    yield ref, pixels, item.data
                if len(seen) == len(refs):
                    break
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # closes the tar stream now, not at garbage collection
        missing = len(refs) - len(seen)
        if missing:
            logger.warning("%d wanted image(s) not found in shard %s", missing, shard.shard_id)
            counts["images:missing"] += missing

    def _decode(
        self, data: bytes | None, error: str | None, ref: ImageRef, counts: Counter
    ) -> np.ndarray | None:
        if data is None:
            logger.warning("image %s unreadable in shard %s: %s", ref.image_id, ref.shard_id, error)
            counts["images:unreadable"] += 1
            return None
        try:
            pixels = decode_image(data, self.max_pixels)
        except ImageDecodeError as e:
            logger.warning("image %s cannot be decoded: %s", ref.image_id, e)
            counts["images:decode_error"] += 1
            return None
        if pixels.shape[:2] != (ref.height, ref.width):
            logger.warning(
                "image %s is %dx%d but its row says %dx%d: dropped",
                ref.image_id,
                pixels.shape[1],
                pixels.shape[0],
                ref.width,
                ref.height,
            )
            counts["images:size_mismatch"] += 1
            return None
        return pixels
