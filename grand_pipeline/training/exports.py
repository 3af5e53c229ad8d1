"""The training export formats; importing this module registers them in ``export.FORMATS``.

The core reaches this module only through the ``grand.export_formats`` entry point. Every format
converts ok rows with ``convert.convert_row`` under the options ``--only-verified/--all-captions``,
``--methods`` and ``--no-floating`` (``ConvertOptions``' defaults otherwise: verified dense
captions, ``exact`` + ``embedding``, floating objects kept), so every drop is counted by reason in
the summary. They need level 3 (grounded captions); below it they raise ``NotReadyError``.

- ``glamm``: our lossless layout, ``TO/{gcg,refseg,region,caption}.jsonl``, one
  ``samples.to_json`` per line. Images are referenced, not copied: each line's ``image`` names
  ``(shard_id, file_name)``, resolved against the run's input (in the summary). Duplicate phrases
  are kept.
- ``grandf-gcg``: the authors' GranD-f GCG layout (glamm reference §3.2), ``TO/grandf_gcg.json``,
  a list of ``{file_name, caption, groundings: {phrase: {token_positives: [s, e], rle_masks}}}``,
  plus ``TO/images/<image_id>.jpg`` read from the source shards (one streaming pass per shard;
  SA-1B JPEG bytes are written as they are, other images re-encoded). Every GCG sample (dense
  caption and grounded short captions) is an entry; an image whose pixels cannot be read or do
  not have the row's size is dropped with its entries (counted).

  * ``rle_masks`` is **one** mask per phrase, the OR of its objects' masks. Their loader adds the
    decoded RLEs into a uint8 array without binarising, so one RLE per object would give 2 where
    objects overlap (a non-binary BCE/Dice target, and 256 overlaps wrap to 0); the single OR'ed
    mask makes their sum the binary union.
  * ``groundings`` is keyed by phrase text, so a second identical phrase cannot be represented:
    the first (in start order) is kept, the others are counted and listed (``collisions``).
  * Their loader ``strip('"')``s the caption, which would shift every offset after a leading
    quote; the caption is written already stripped, offsets shifted, and a phrase inside the
    stripped quotes is dropped (counted).
- ``gcg-oracle``: the GCG ground truth (``rows.gcg_ground_truth``, what ``grand glamm eval-gcg
  --gt OUTPUT`` reads) as prediction files ``TO/predictions/<image_id>.json`` =
  ``{image_id, caption, phrases, pred_masks, scores}``, so evaluating them scores 1.0. The
  folder holds only predictions.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from grand_pipeline.config import ConfigError
from grand_pipeline.export import (
    ExportJob,
    ExportOptions,
    atomic_open,
    register_format,
    safe_file_name,
    write_json_atomic,
)
from grand_pipeline.run_meta import RunMeta
from grand_pipeline.training.data.convert import ConvertConfigError, ConvertOptions, convert_row
from grand_pipeline.training.data.images import ImageSource, input_uri
from grand_pipeline.training.data.rows import gcg_ground_truth, training_level
from grand_pipeline.training.data.samples import TASKS, GCGSample, ImageRef, to_json

logger = logging.getLogger(__name__)

OPTIONS = frozenset({"only_verified", "methods", "floating"})
GRANDF_FILE = "grandf_gcg.json"
IMAGES = "images"
PREDICTIONS = "predictions"
_JPEG_MAGIC = b"\xff\xd8\xff"


def convert_options(job: ExportJob) -> ConvertOptions:
    """The converters' options for ``job``; raises ``NotReadyError`` below level 3."""
    training_level(job.store)  # NotReadyError (a StoreError: one line, exit 2) below level 3
    given: ExportOptions = job.options
    chosen: dict[str, Any] = {
        k: v
        for k, v in (("only_verified", given.only_verified), ("floating", given.floating))
        if v is not None
    }
    if given.methods is not None:
        chosen["methods"] = tuple(given.methods)
    try:
        return ConvertOptions(**chosen)
    except ConvertConfigError as exc:
        raise ConfigError(f"--{exc}") from None


def add_gcg_counts(counts: Counter, scratch: Counter) -> None:
    """Merge the row, GCG and phrase counts of ``scratch``: a GCG-only format's summary should not
    list the other tasks' counts ``convert_row`` also makes."""
    counts.update({k: v for k, v in scratch.items() if k.split(":", 1)[0] in ("rows", "gcg", "phrase")})


def jsonl(handle: Any, item: Any) -> None:
    handle.write(json.dumps(item, ensure_ascii=False) + "\n")


@register_format("glamm", accepts=OPTIONS)
def export_glamm(job: ExportJob) -> dict[str, Any]:
    """``TO/<task>.jsonl`` per task (see the module docstring)."""
    opts = convert_options(job)
    written: Counter = Counter()
    with ExitStack() as stack:
        files = {task: stack.enter_context(atomic_open(job.target / f"{task}.jsonl")) for task in TASKS}
        for row in job.rows():
            samples = convert_row(row, opts, job.counts)
            for task in TASKS:
                for sample in samples.by_task(task):
                    jsonl(files[task], to_json(sample))
                    written[task] += 1
    return {
        "convert_options": asdict(opts),
        "exported": sum(written.values()),
        "unit": "sample(s)",
        "samples": {task: written[task] for task in TASKS},
        "layout": {f"{task}.jsonl": f"{task} samples, one samples.to_json per line" for task in TASKS},
        "images": {
            "input": (RunMeta(job.store).read_run_meta() or {}).get("input"),
            "key": "image.shard_id, image.file_name",
        },
    }


def grandf_entry(
    sample: GCGSample, counts: Counter, collisions: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """One GranD-f GCG entry of ``sample`` (the module docstring's rules), or None if no phrase is left."""
    caption = sample.caption.strip('"')
    shift = len(sample.caption) - len(sample.caption.lstrip('"'))
    groundings: dict[str, dict[str, Any]] = {}
    for phrase in sample.phrases:
        start, end = phrase.start - shift, phrase.end - shift
        if start < 0 or end > len(caption):
            counts["grandf:phrase_in_stripped_quotes"] += 1
        elif phrase.text in groundings:
            counts["grandf:phrase_collision"] += 1
            collisions.append(
                {
                    "image_id": sample.image.image_id,
                    "source": sample.source,
                    "phrase": phrase.text,
                    "kept": groundings[phrase.text]["token_positives"],
                    "dropped": [start, end],
                }
            )
        else:
            groundings[phrase.text] = {"token_positives": [start, end], "rle_masks": [dict(phrase.mask)]}
    if not groundings:
        counts["grandf:no_phrases"] += 1
        return None
    return {
        "file_name": safe_file_name(sample.image.image_id, ".jpg"),
        "caption": caption,
        "groundings": groundings,
    }


def as_jpeg(data: bytes, pixels: np.ndarray, counts: Counter) -> bytes:
    """The source bytes when they are a JPEG (no second compression), else a JPEG of ``pixels``."""
    if data.startswith(_JPEG_MAGIC):
        return data
    counts["images:reencoded"] += 1
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_images(
    source: ImageSource, shard: str, wanted: dict[str, ImageRef], folder: Path, counts: Counter
) -> set[str]:
    """Write ``wanted``'s images (all in ``shard``) from one streaming pass over the source shard
    (``ImageSource``: its checks and counts); returns the ids written. The source bytes are kept,
    so a JPEG is copied, not compressed a second time. Files are named from the (safe) image id,
    never from a tar member name."""
    written: set[str] = set()
    for ref, pixels, data in source.iter_encoded(wanted.values(), counts):
        with atomic_open(folder / safe_file_name(ref.image_id, ".jpg"), "wb") as handle:
            handle.write(as_jpeg(data, pixels, counts))
        written.add(ref.image_id)
    counts["images:ok"] += len(written)
    return written


@register_format("grandf-gcg", accepts=OPTIONS)
def export_grandf_gcg(job: ExportJob) -> dict[str, Any]:
    """``TO/grandf_gcg.json`` + ``TO/images/`` (see the module docstring)."""
    opts = convert_options(job)
    source = ImageSource(input_uri(job.store))
    folder = job.target / IMAGES
    folder.mkdir(exist_ok=True)
    collisions: list[dict[str, Any]] = []
    entries = images = 0
    with atomic_open(job.target / GRANDF_FILE) as out:
        out.write("[")
        for shard, rows in job.shards():
            pending: dict[str, list[dict[str, Any]]] = {}  # image id -> entries, in row order
            wanted: dict[str, ImageRef] = {}
            for row in rows:
                scratch: Counter = Counter()
                samples = convert_row(row, opts, scratch).gcg
                add_gcg_counts(job.counts, scratch)
                for sample in samples:
                    entry = grandf_entry(sample, job.counts, collisions)
                    if entry is not None:
                        pending.setdefault(sample.image.image_id, []).append(entry)
                        wanted[sample.image.image_id] = sample.image
            written = write_images(source, shard, wanted, folder, job.counts) if wanted else set()
            for image_id, items in pending.items():
                if image_id not in written:
                    job.counts["grandf:no_image"] += len(items)
                    continue
                for entry in items:
                    out.write(("," if entries else "") + "\n" + json.dumps(entry, ensure_ascii=False))
                    entries += 1
            images += len(written)
        out.write("\n]\n")
    return {
        "convert_options": asdict(opts),
        "exported": entries,
        "unit": "GCG sample(s)",
        "images_written": images,
        "collisions": len(collisions),
        "collided_phrases": collisions,
        "layout": {GRANDF_FILE: "GranD-f GCG list", f"{IMAGES}/<image_id>.jpg": "the images it names"},
    }


def prediction(sample: GCGSample) -> dict[str, Any]:
    """The prediction file of a model that outputs ``sample`` exactly (every score 1.0)."""
    return {
        "image_id": sample.image.image_id,
        "caption": sample.caption,
        "phrases": [p.text for p in sample.phrases],
        "pred_masks": [dict(p.mask) for p in sample.phrases],
        "scores": [1.0] * len(sample.phrases),
    }


@register_format("gcg-oracle", accepts=OPTIONS)
def export_gcg_oracle(job: ExportJob) -> dict[str, Any]:
    """``TO/predictions/<image_id>.json`` per ground-truth image (see the module docstring)."""
    opts = convert_options(job)
    folder = job.target / PREDICTIONS
    folder.mkdir(exist_ok=True)
    written = 0
    scratch: Counter = Counter()
    for sample in gcg_ground_truth(job.rows(), opts, scratch):
        write_json_atomic(folder / safe_file_name(sample.image.image_id, ".json"), prediction(sample))
        written += 1
    add_gcg_counts(job.counts, scratch)
    return {
        "convert_options": asdict(opts),
        "exported": written,
        "unit": "prediction file(s)",
        "layout": {f"{PREDICTIONS}/<image_id>.json": "{image_id, caption, phrases, pred_masks, scores}"},
    }
