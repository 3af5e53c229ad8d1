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
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

from grand_pipeline.config import ConfigError
from grand_pipeline.geometry import rle
from grand_pipeline.schemas import STATUS_OK
from grand_pipeline.training.data.samples import (
    TASKS,
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

#: The columns the converters read. Readers project on them: a level-4 row also carries the scene
#: graph, every LLM attempt and the low-resolution depth map, which no sample needs.
ROW_COLUMNS = [
    "image_id", "shard_id", "file_name", "width", "height", "status",
    "objects", "floating_objects", "short_captions", "short_captions_grounded", "dense_caption",
]  # fmt: skip


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
        rle.area([mask])  # parses the counts: sizes that add up, no stray characters
    except (ValueError, TypeError):
        return False
    return [int(v) for v in mask["size"]] == [height, width]


def or_mask(masks: list[Any]) -> Any:
    """The OR of already-validated masks; one mask is itself (most phrases name one object)."""
    return masks[0] if len(masks) == 1 else rle.union(masks)


class RowMasks:
    """A row's object masks, each checked (decodable, of the image's size) on first use only: a
    loader that trains one task of an image never parses the masks that task does not touch."""

    def __init__(self, row: dict[str, Any]):
        self.height, self.width = int(row.get("height") or 0), int(row.get("width") or 0)
        self.raw: dict[int, Any] = {}
        self.floating: set[int] = set()
        for key in ("objects", "floating_objects"):
            for obj in row.get(key) or []:
                self.raw[int(obj["id"])] = obj.get("segmentation")
                if key == "floating_objects":
                    self.floating.add(int(obj["id"]))
        self._valid: dict[int, bool] = {}

    def valid(self, oid: int) -> bool:
        if oid not in self._valid:
            self._valid[oid] = valid_mask(self.raw.get(oid), self.height, self.width)
        return self._valid[oid]

    def __getitem__(self, oid: int) -> Any:
        return self.raw[oid]


def _usable(detail: dict[str, Any], caption: str, row_masks: RowMasks, opts: ConvertOptions, counts: Counter) -> bool:
    start, end = (list(detail.get("tokens_positive") or []) + [None, None])[:2]
    ids = [int(i) for i in detail.get("ids") or []]
    if detail.get("method") not in opts.methods:
        counts[f"phrase:method_{detail.get('method')}"] += 1
    elif start is None or end is None or caption[start:end] != detail["phrase"] or start >= end:
        counts["phrase:bad_offsets"] += 1
    elif not ids:
        counts["phrase:no_ids"] += 1
    elif any(i not in row_masks.raw for i in ids):
        counts["phrase:unknown_id"] += 1
    elif not opts.floating and any(i in row_masks.floating for i in ids):
        counts["phrase:floating"] += 1
    elif not all(row_masks.valid(i) for i in ids):
        counts["phrase:bad_mask"] += 1
    else:
        return True
    return False


def disjoint_phrases(details: list[dict[str, Any]], masks: RowMasks, counts: Counter) -> list[Phrase]:
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
        Phrase(text=text, start=s, end=e, ids=tuple(ids), mask=or_mask([masks[v] for v in ids]), method=m)
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
    phrases = disjoint_phrases(usable, row_masks, counts)
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


def _expressed(row: dict[str, Any], unit: str, counts: Counter) -> list[tuple[dict[str, Any], str]]:
    """(object, expression) in id order, skipping (and counting under ``unit``) unusable ones."""
    out = []
    for obj in sorted(row.get("objects") or [], key=lambda o: int(o["id"])):
        text = expression(obj)
        if not text:
            counts[f"{unit}:no_expression"] += 1
        elif has_special(text):
            counts[f"{unit}:special_token"] += 1
        else:
            out.append((obj, text))
    return out


def refseg_samples(
    row: dict[str, Any], image: ImageRef, row_masks: RowMasks, counts: Counter
) -> list[RefSegSample]:
    """One referring-segmentation sample per object with an expression and a valid mask."""
    out = []
    for obj, text in _expressed(row, "refseg", counts):
        oid = int(obj["id"])
        if not row_masks.valid(oid):
            counts["refseg:bad_mask"] += 1
            continue
        out.append(RefSegSample(image=image, object_id=oid, expression=text, bbox=_box(obj), mask=row_masks[oid]))
    counts["refseg:ok"] += len(out)
    return out


def region_samples(
    row: dict[str, Any], image: ImageRef, opts: ConvertOptions, counts: Counter
) -> list[RegionCapSample]:
    """Objects with an expression, ``max_regions`` boxes per sample (no mask is needed)."""
    regions = [Region(int(obj["id"]), _box(obj), text) for obj, text in _expressed(row, "region", counts)]
    chunks = [tuple(regions[i : i + opts.max_regions]) for i in range(0, len(regions), opts.max_regions)]
    counts["region:ok"] += len(chunks)
    return [RegionCapSample(image=image, regions=chunk) for chunk in chunks]


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


def row_ok(row: dict[str, Any], counts: Counter) -> bool:
    """Whether a row can give samples; counts ``rows:ok`` or ``rows:error`` (error rows give none)."""
    ok = row.get("status") == STATUS_OK
    counts["rows:ok" if ok else "rows:error"] += 1
    return ok


def gcg_samples(row: dict[str, Any], image: ImageRef, row_masks: RowMasks, opts: ConvertOptions, counts: Counter) -> list[GCGSample]:
    """The dense caption's sample (under the ``verified`` filter), then the grounded short captions'."""
    out: list[GCGSample] = []
    dense = row.get("dense_caption")
    if dense is None:
        counts["gcg:no_dense_caption"] += 1
    elif opts.only_verified and not dense.get("verified"):
        counts["gcg:unverified"] += 1
    else:
        sample = gcg_sample(
            image, dense.get("caption"), dense.get("details"), "dense", dense.get("verified"), row_masks, opts, counts
        )
        out += [sample] if sample else []
    if opts.short_gcg:
        for i, item in enumerate(row.get("short_captions_grounded") or []):
            sample = gcg_sample(
                image, item.get("caption"), item.get("details"), f"short:{i}", None, row_masks, opts, counts
            )
            out += [sample] if sample else []
    return out


def convert_tasks(
    row: dict[str, Any], opts: ConvertOptions, counts: Counter, tasks: Collection[str] = TASKS
) -> RowSamples:
    """The samples of ``tasks`` from one ok row (see :func:`row_ok`); masks are checked only as
    the chosen tasks use them."""
    image, row_masks, out = image_ref(row), RowMasks(row), RowSamples()
    if "gcg" in tasks:
        out.gcg = gcg_samples(row, image, row_masks, opts, counts)
    if "refseg" in tasks:
        out.refseg = refseg_samples(row, image, row_masks, counts)
    if "region" in tasks:
        out.region = region_samples(row, image, opts, counts)
    if "caption" in tasks:
        out.caption = caption_samples(row, image, opts, counts)
    return out


def convert_row(row: dict[str, Any], opts: ConvertOptions, counts: Counter) -> RowSamples:
    """All samples of one committed row; an error row yields nothing and counts ``rows:error``."""
    return convert_tasks(row, opts, counts) if row_ok(row, counts) else RowSamples()
