"""The GLaMM training samples one committed row turns into, as plain frozen dataclasses.

Masks stay COCO RLE (``{"size": [h, w], "counts": str}``) until a Dataset decodes them, so a
whole shard's samples fit in memory and exports can write them as they are. Boxes are
``[x1, y1, x2, y2]`` in original-image pixels, as everywhere in the pipeline.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

RLE = dict[str, Any]

#: Strings GLaMM's tokenizer or conversation template gives a meaning to. A caption holding one
#: would inject structure into the tagged text (a stray ``[SEG]`` would take a mask), so such a
#: caption is refused, never escaped.
SPECIAL_STRINGS = ("<p>", "</p>", "[SEG]", "<image>", "<bbox>", "<im_start>", "<im_end>", "<point>", "<s>", "</s>")


@dataclass(frozen=True)
class ImageRef:
    """Where a sample's pixels are: the source shard and member, and the size the row was made at."""

    image_id: str
    shard_id: str
    file_name: str
    width: int
    height: int


@dataclass(frozen=True)
class Phrase:
    """One grounded phrase: ``caption[start:end] == text``; ``mask`` is the OR of ``ids``' masks."""

    text: str
    start: int
    end: int
    ids: tuple[int, ...]
    mask: RLE
    method: str


@dataclass(frozen=True)
class GCGSample:
    """Grounded conversation generation: a caption whose phrases are disjoint and in start order,
    so the k-th ``[SEG]`` of the tagged answer pairs with ``phrases[k].mask``."""

    image: ImageRef
    caption: str
    phrases: tuple[Phrase, ...]
    source: str  # "dense" or "short:<index into short_captions_grounded>"
    verified: bool | None = None
    task: str = field(default="gcg", init=False)


@dataclass(frozen=True)
class RefSegSample:
    """Referring-expression segmentation: one expression of one object, and its mask."""

    image: ImageRef
    object_id: int
    expression: str
    bbox: tuple[float, float, float, float]
    mask: RLE
    task: str = field(default="refseg", init=False)


@dataclass(frozen=True)
class Region:
    object_id: int
    bbox: tuple[float, float, float, float]
    expression: str


@dataclass(frozen=True)
class RegionCapSample:
    """Region captioning: the boxes asked about (pixels) and, per box, the expression to answer."""

    image: ImageRef
    regions: tuple[Region, ...]
    task: str = field(default="region", init=False)


@dataclass(frozen=True)
class CaptionSample:
    """Image captioning: one short or dense caption of the whole image."""

    image: ImageRef
    caption: str
    source: str  # "dense" or "short:<index into short_captions>"
    task: str = field(default="caption", init=False)


Sample = GCGSample | RefSegSample | RegionCapSample | CaptionSample

TASKS = ("gcg", "refseg", "region", "caption")


@dataclass
class RowSamples:
    """Everything one row yields, by task."""

    gcg: list[GCGSample] = field(default_factory=list)
    refseg: list[RefSegSample] = field(default_factory=list)
    region: list[RegionCapSample] = field(default_factory=list)
    caption: list[CaptionSample] = field(default_factory=list)

    def by_task(self, task: str) -> list[Any]:
        if task not in TASKS:
            raise KeyError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
        return getattr(self, task)

    def __len__(self) -> int:
        return sum(len(self.by_task(t)) for t in TASKS)


def to_json(sample: Sample) -> dict[str, Any]:
    """A JSON-ready dict of ``sample`` (tuples become lists), the ``glamm`` export's line format."""
    return asdict(sample)


def has_special(text: str) -> bool:
    return any(token in text for token in SPECIAL_STRINGS)
