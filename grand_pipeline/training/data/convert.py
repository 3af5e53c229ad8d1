"""Pure converters: one committed level-3/4 row -> GLaMM samples of each task.

No torch, no IO: a row dict in, samples and counts out. Everything a filter drops is counted
in the caller's ``Counter`` under ``"<unit>:<reason>"`` (units: ``rows``, ``gcg``, ``phrase``,
``refseg``, ``region``, ``caption``), so nothing is lost silently.

**GCG.** Sources are the dense caption (``verified`` only, by default) and each grounded short
caption. A detail is kept when its method is allowed (``exact`` and ``embedding`` by default),
``caption[s:e] == phrase``, and every id names an object (floating objects optional) whose mask
is a valid RLE of the image's size. Its mask is the OR of those objects' masks.

**Disjoint spans**, the documented rule. Kept details are visited in (start ascending, length
descending, sorted ids, method) order, so the result does not depend on the order of the input:
  1. a span identical to the last kept one is merged into it (ids united, mask re-ORed), because
     two details over the same characters name one phrase with several objects;
  2. a span that starts before the last kept one ends (nested or partly overlapping) is dropped:
     the outer (or earlier) span wins, since it names the whole referent;
  3. anything else is kept.
The same phrase text at two different places is two phrases: both are kept.

**Referring segmentation** (the reference's rule): per object, its first attribute that contains
one of its labels, else its first attribute, else its label. **Region captioning**: objects in id
order, ``max_regions`` boxes per sample, each answered by that expression. **Captioning**: every
short caption, and the dense caption under the same ``verified`` filter as GCG.

A caption containing a special-token string (``samples.SPECIAL_STRINGS``) is refused.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from grand_pipeline.config import ConfigError
from grand_pipeline.geometry import rle
from grand_pipeline.schemas import STATUS_OK
from grand_pipeline.training.data.samples import (
    CaptionSample,
    GCGSample,
    ImageRef,
    Phrase,
    RefSegSample,
    Region,
    RegionCapSample,
    RowSamples,
    has_special,
)

METHODS = ("exact", "embedding", "noun")


class ConvertConfigError(ConfigError):
    """A converter option that cannot work; the message names the option."""


@dataclass(frozen=True)
class ConvertOptions:
    """Filters of the converters; the defaults are what GLaMM should learn from."""

    methods: tuple[str, ...] = ("exact", "embedding")
    only_verified: bool = True
    floating: bool = True  # level 2 gives floating objects masks, so their phrases can train
    short_gcg: bool = True  # grounded short captions as extra GCG samples
    max_regions: int = 10

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown or not self.methods:
            raise ConvertConfigError(f"methods: {unknown or 'empty'}; choose from {', '.join(METHODS)}")
        if self.max_regions < 1:
            raise ConvertConfigError(f"max_regions: must be >= 1, got {self.max_regions}")


def image_ref(row: dict[str, Any]) -> ImageRef:
    return ImageRef(
        image_id=str(row["image_id"]),
        shard_id=str(row["shard_id"]),
        file_name=str(row.get("file_name") or ""),
        width=int(row.get("width") or 0),
        height=int(row.get("height") or 0),
    )


def valid_mask(mask: Any, height: int, width: int) -> bool:
    """True when ``mask`` parses as an RLE of exactly (height, width)."""
    if not mask:
        return False
    try:
        rle.area([mask])
    except (ValueError, TypeError):
        return False
    return [int(v) for v in mask["size"]] == [height, width]


class RowMasks(NamedTuple):
    masks: dict[int, Any]  # id -> RLE of every object whose mask is valid at the image's size
    floating: set[int]  # ids of floating objects
    broken: set[int]  # ids whose mask is missing, undecodable or of another size


def object_masks(row: dict[str, Any]) -> RowMasks:
    """The masks of a row's objects and floating objects, checked once per row."""
    height, width = int(row.get("height") or 0), int(row.get("width") or 0)
    masks: dict[int, Any] = {}
    floating: set[int] = set()
    broken: set[int] = set()
    for key in ("objects", "floating_objects"):
        for obj in row.get(key) or []:
            oid = int(obj["id"])
            if key == "floating_objects":
                floating.add(oid)
            if valid_mask(obj.get("segmentation"), height, width):
                masks[oid] = obj["segmentation"]
            else:
                broken.add(oid)
    return RowMasks(masks, floating, broken)


def _usable(detail: dict[str, Any], caption: str, row_masks: RowMasks, opts: ConvertOptions, counts: Counter) -> bool:
    masks, floating, broken = row_masks
    start, end = (list(detail.get("tokens_positive") or []) + [None, None])[:2]
    ids = [int(i) for i in detail.get("ids") or []]
    if detail.get("method") not in opts.methods:
        counts[f"phrase:method_{detail.get('method')}"] += 1
    elif start is None or end is None or caption[start:end] != detail["phrase"] or start >= end:
        counts["phrase:bad_offsets"] += 1
    elif not ids:
        counts["phrase:no_ids"] += 1
    elif not opts.floating and any(i in floating for i in ids):
        counts["phrase:floating"] += 1
    elif any(i in broken for i in ids):
        counts["phrase:bad_mask"] += 1
    elif any(i not in masks for i in ids):
        counts["phrase:unknown_id"] += 1
    else:
        return True
    return False


def disjoint_phrases(details: list[dict[str, Any]], masks: dict[int, Any], counts: Counter) -> list[Phrase]:
    """The module docstring's span rule over already-filtered ``details``; phrases in start order."""
    def key(d: dict[str, Any]) -> tuple:
        start, end = d["tokens_positive"][:2]
        return (int(start), -int(end), sorted(int(v) for v in d["ids"]), str(d.get("method")))

    kept: list[tuple[int, int, str, list[int], str]] = []
    for d in sorted(details, key=key):
        start, end = int(d["tokens_positive"][0]), int(d["tokens_positive"][1])
        ids = sorted({int(v) for v in d["ids"]})
        if kept and (start, end) == kept[-1][:2]:
            merged = sorted(set(kept[-1][3]) | set(ids))
            kept[-1] = (start, end, kept[-1][2], merged, kept[-1][4])
            counts["phrase:merged_same_span"] += 1
        elif kept and start < kept[-1][1]:
            counts["phrase:overlap"] += 1
        else:
            kept.append((start, end, str(d["phrase"]), ids, str(d.get("method"))))
    return [
        Phrase(text=text, start=s, end=e, ids=tuple(ids), mask=rle.union([masks[v] for v in ids]), method=m)
        for s, e, text, ids, m in kept
    ]


def gcg_sample(
    image: ImageRef,
    caption: str | None,
    details: Iterable[dict[str, Any]] | None,
    source: str,
    verified: bool | None,
    row_masks: RowMasks,
    opts: ConvertOptions,
    counts: Counter,
) -> GCGSample | None:
    caption = caption or ""
    if not caption.strip():
        counts["gcg:empty_caption"] += 1
        return None
    if has_special(caption):
        counts["gcg:special_token"] += 1
        return None
    usable = [d for d in details or [] if _usable(d, caption, row_masks, opts, counts)]
    phrases = disjoint_phrases(usable, row_masks.masks, counts)
    if not phrases:
        counts["gcg:no_phrases"] += 1
        return None
    counts["gcg:ok"] += 1
    return GCGSample(image=image, caption=caption, phrases=tuple(phrases), source=source, verified=verified)


def expression(obj: dict[str, Any]) -> str:
    """The reference's referring expression of one object (see the module docstring)."""
    labels = [str(v).lower() for v in obj.get("labels") or [] if v]
    attributes = [str(a).strip() for a in obj.get("attributes") or [] if a and str(a).strip()]
    for attribute in attributes:
        if any(label in attribute.lower() for label in labels):
            return attribute
    if attributes:
        return attributes[0]
    return str(obj.get("label") or "").strip()


def _box(obj: dict[str, Any]) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in obj["bbox"])
    return (x1, y1, x2, y2)


def object_samples(
    row: dict[str, Any], image: ImageRef, row_masks: RowMasks, opts: ConvertOptions, counts: Counter
) -> tuple[list[RefSegSample], list[RegionCapSample]]:
    """Referring-segmentation samples (objects with a valid mask) and region-captioning samples."""
    refseg: list[RefSegSample] = []
    regions: list[Region] = []
    masks = row_masks.masks
    for obj in sorted(row.get("objects") or [], key=lambda o: int(o["id"])):
        text = expression(obj)
        if not text:
            counts["refseg:no_expression"] += 1
            continue
        if has_special(text):
            counts["refseg:special_token"] += 1
            continue
        oid = int(obj["id"])
        regions.append(Region(object_id=oid, bbox=_box(obj), expression=text))
        if oid not in masks:
            counts["refseg:bad_mask"] += 1
            continue
        refseg.append(RefSegSample(image=image, object_id=oid, expression=text, bbox=_box(obj), mask=masks[oid]))
    chunks = [tuple(regions[i : i + opts.max_regions]) for i in range(0, len(regions), opts.max_regions)]
    counts["refseg:ok"] += len(refseg)
    counts["region:ok"] += len(chunks)
    return refseg, [RegionCapSample(image=image, regions=chunk) for chunk in chunks]


def caption_samples(row: dict[str, Any], image: ImageRef, opts: ConvertOptions, counts: Counter) -> list[CaptionSample]:
    candidates = [(c.get("caption"), f"short:{i}") for i, c in enumerate(row.get("short_captions") or [])]
    dense = row.get("dense_caption")
    if dense and dense.get("caption"):
        if opts.only_verified and not dense.get("verified"):
            counts["caption:unverified"] += 1
        else:
            candidates.append((dense["caption"], "dense"))
    out = []
    for text, source in candidates:
        text = (text or "").strip()
        if not text:
            counts["caption:empty"] += 1
        elif has_special(text):
            counts["caption:special_token"] += 1
        else:
            out.append(CaptionSample(image=image, caption=text, source=source))
    counts["caption:ok"] += len(out)
    return out


def convert_row(row: dict[str, Any], opts: ConvertOptions, counts: Counter) -> RowSamples:
    """All samples of one committed row; an error row yields nothing and counts ``rows:error``."""
    if row.get("status") != STATUS_OK:
        counts["rows:error"] += 1
        return RowSamples()
    counts["rows:ok"] += 1
    image = image_ref(row)
    row_masks = object_masks(row)
    out = RowSamples()
    dense = row.get("dense_caption")
    if dense is None:
        counts["gcg:no_dense_caption"] += 1
    elif opts.only_verified and not dense.get("verified"):
        counts["gcg:unverified"] += 1
    else:
        sample = gcg_sample(
            image, dense.get("caption"), dense.get("details"), "dense", dense.get("verified"), row_masks, opts, counts
        )
        out.gcg += [sample] if sample else []
    if opts.short_gcg:
        for i, item in enumerate(row.get("short_captions_grounded") or []):
            sample = gcg_sample(
                image, item.get("caption"), item.get("details"), f"short:{i}", None, row_masks, opts, counts
            )
            out.gcg += [sample] if sample else []
    out.refseg, out.region = object_samples(row, image, row_masks, opts, counts)
    out.caption = caption_samples(row, image, opts, counts)
    return out
