"""Sub-shard work units: the unit of work, of commit and of retry.

An SA-1B shard holds about 11,000 images, about 12 GPU-hours of Level 1. Committing whole shards
would make a preempted node lose all of it, so every shard is split into units of at most
``engine.unit_images`` images, in the order the source reader yields them. Each (level, unit) is
committed once, through the same staging/claim/publish/marker protocol a shard used to be.

The split is fixed by the shard's *index*: its image ids in reader order and, for uncompressed
tars, the byte offset of each image's first member, so a unit seeks to its own bytes instead of
reading the ones before it. The index is computed once (a header-only pass), stored with the run
(``OUT/_run/units/{shard}.json``) and read back by every later level, resume and retry.

Unit ids are ``{shard_id}@{index:05d}``: ``@`` never occurs in a shard id, so the split is exact.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from grand_pipeline.sources.base import ShardRef

UNIT_SEP = "@"
UNIT_ID_RE = re.compile(r"^(?P<shard>[A-Za-z0-9_.-]+)@(?P<index>\d{5})$")
INDEX_VERSION = 1


class UnitError(ValueError):
    """A unit id or a stored shard index that cannot be used."""


def unit_id(shard_id: str, index: int) -> str:
    return f"{shard_id}{UNIT_SEP}{index:05d}"


def split_unit_id(uid: str) -> tuple[str, int]:
    """``"sa_000001@00003"`` -> ``("sa_000001", 3)``; UnitError for anything else."""
    match = UNIT_ID_RE.match(uid) if isinstance(uid, str) else None
    if match is None:
        raise UnitError(f"invalid unit id {uid!r}: expected '<shard>@<5 digits>'")
    return match.group("shard"), int(match.group("index"))


@dataclass(frozen=True)
class UnitRef:
    """One unit: which shard, which images (reader order), and where its bytes start."""

    shard: ShardRef
    index: int
    image_ids: tuple[str, ...]
    start: int = 0  # byte offset of the first member to read (uncompressed tars); 0 = the top

    @property
    def unit_id(self) -> str:
        return unit_id(self.shard.shard_id, self.index)

    @property
    def shard_id(self) -> str:
        return self.shard.shard_id


@dataclass(frozen=True)
class ShardIndex:
    """A shard's image ids in reader order and its split into units (the stored document)."""

    shard_id: str
    unit_images: int
    image_ids: tuple[str, ...]
    offsets: tuple[int, ...] | None = None  # None: the shard cannot be entered mid-way

    def __post_init__(self) -> None:
        if self.unit_images < 1:
            raise UnitError(f"unit_images must be >= 1, got {self.unit_images}")
        if self.offsets is not None and len(self.offsets) != len(self.image_ids):
            raise UnitError(f"index of {self.shard_id}: {len(self.offsets)} offsets for {len(self.image_ids)} ids")

    @property
    def num_units(self) -> int:
        # An empty shard still has one (empty) unit, so that every shard is visibly done.
        return max(1, -(-len(self.image_ids) // self.unit_images))

    def unit_ids(self) -> list[str]:
        return [unit_id(self.shard_id, k) for k in range(self.num_units)]

    def units(self, ref: ShardRef) -> Iterator[UnitRef]:
        size = self.unit_images
        for k in range(self.num_units):
            yield UnitRef(ref, k, tuple(self.image_ids[k * size : (k + 1) * size]), self.start_of(k))

    def start_of(self, k: int) -> int:
        """Byte offset where unit ``k``'s reading starts (0: from the top of the file)."""
        if self.offsets is None or k == 0:
            return 0
        # A half pair or a truncation item has no offset (-1): read from the top then.
        offsets = self.offsets[k * self.unit_images : (k + 1) * self.unit_images]
        return 0 if not offsets or min(offsets) < 0 else min(offsets)

    def to_doc(self) -> dict[str, Any]:
        return {
            "version": INDEX_VERSION,
            "shard": self.shard_id,
            "unit_images": self.unit_images,
            "image_ids": list(self.image_ids),
            "offsets": None if self.offsets is None else list(self.offsets),
        }

    @classmethod
    def from_doc(cls, doc: Any, shard_id: str) -> ShardIndex:
        try:
            if doc.get("version") != INDEX_VERSION or doc["shard"] != shard_id:
                raise UnitError(f"index of {shard_id}: unknown version or wrong shard")
            ids, offsets = doc["image_ids"], doc["offsets"]
            if not all(isinstance(i, str) for i in ids):
                raise UnitError(f"index of {shard_id}: image ids are not strings")
            return cls(
                shard_id,
                int(doc["unit_images"]),
                tuple(ids),
                None if offsets is None else tuple(int(o) for o in offsets),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise UnitError(f"unreadable unit index of shard {shard_id}: {exc}") from None
