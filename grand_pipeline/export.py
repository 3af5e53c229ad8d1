"""``grand export``: committed rows -> files in a published layout.

A format is an **exporter**: a callable that receives an :class:`ExportJob` (the store, the level
read, the target folder, the options and a ``Counter``), streams the committed rows shard by shard,
writes its files and returns its part of the summary. :class:`PerImageJson` is the kind that writes
one JSON document per ok image; the reference layouts ``grand-json`` and ``grand-ref`` are two of
them (``export_ref.py``). Training formats live in add-ons, registered through the
``grand.export_formats`` entry point (``plugins.py``), so the core never imports them.

Rows come from the highest level that has committed shards (every row is cumulative, so that
level holds everything). Error rows are not exported: the job counts them (``rows:error``) and
lists them with their errors; every filter drop is counted by reason (``<unit>:<reason>``).
An image id held by more than one shard is never written twice under one name: every copy
becomes ``<image_id>__<shard>.json``, counted (``images:duplicate_id``) and listed in the summary.

**Layout.** The summary is ``TO/_export/summary.json``, written last, so its presence means the
export finished, and it never sits among the data files where a loader globbing ``TO/*.json``
(or listing a format's data folder) would read it. Every file is written under a temporary name
and renamed, so a reader never sees half a file. ``--to`` is a local folder.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Any, Protocol

from grand_pipeline import plugins
from grand_pipeline.config import ConfigError
from grand_pipeline.registry import Registry
from grand_pipeline.schemas import STATUS_OK
from grand_pipeline.store import Store, StoreError
from grand_pipeline.units import split_unit_id

logger = logging.getLogger(__name__)

#: Where the summary goes, relative to ``--to``.
SUMMARY_PATH = Path("_export") / "summary.json"

Row = dict[str, Any]
Document = dict[str, Any]


def summary_path(to_dir: str | Path) -> Path:
    return Path(to_dir) / SUMMARY_PATH


@dataclass(frozen=True)
class ExportOptions:
    """Filters a format may read; None means "the format's default". A format rejects an option it
    does not read (:attr:`Exporter.accepts`) rather than ignoring it."""

    only_verified: bool | None = None  # keep only verified dense captions
    methods: tuple[str, ...] | None = None  # grounding methods of the phrases kept
    floating: bool | None = None  # phrases grounded on floating objects

    def given(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


#: The CLI flag of each option, for error messages.
FLAGS = {
    "only_verified": "--only-verified/--all-captions",
    "methods": "--methods",
    "floating": "--no-floating",
}


@dataclass
class ExportJob:
    """What an exporter works on. Its row iterators yield ok rows only; error rows are counted
    (``rows:error``) and listed in ``skipped`` as they stream past."""

    store: Store
    level: int
    target: Path
    options: ExportOptions
    counts: Counter = field(default_factory=Counter)
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def shards(self) -> Iterator[tuple[str, Iterator[Row]]]:
        """(shard id, its ok rows) per committed shard, in shard order; one batch in memory."""
        for shard in sorted(self.store.committed(self.level)):
            yield shard, self._ok_rows(shard)

    def rows(self) -> Iterator[Row]:
        for _, rows in self.shards():
            yield from rows

    def shared_ids(self) -> dict[str, list[str]]:
        """image id -> the units whose ok rows hold it, for ids held by more than one unit (two
        shards with the same image). Parses only the two id columns, before any file is written."""
        holders: dict[str, list[str]] = {}
        for unit in sorted(self.store.committed(self.level)):
            table = self.store.read(self.level, unit, columns=["image_id", "status"])
            for image_id, status in zip(table["image_id"].to_pylist(), table["status"].to_pylist(), strict=True):
                if status == STATUS_OK:
                    holders.setdefault(image_id, []).append(unit)
        return {image_id: units for image_id, units in holders.items() if len(units) > 1}

    def _ok_rows(self, shard: str) -> Iterator[Row]:
        for batch in self.store.read(self.level, shard).to_batches():
            for row in batch.to_pylist():
                if row["status"] == STATUS_OK:
                    yield row
                else:
                    self.counts["rows:error"] += 1
                    self.skipped.append(
                        {k: row.get(k) for k in ("image_id", "shard_id", "error_stage", "error")}
                    )


class Exporter(Protocol):
    """Writes a format's files under ``job.target`` and returns its summary: at least
    ``exported`` (int), ``unit`` (what was counted) and ``layout`` (file -> what it holds)."""

    @property
    def accepts(self) -> frozenset[str]:
        """The ExportOptions fields it reads."""
        ...

    def __call__(self, job: ExportJob) -> dict[str, Any]: ...


@dataclass(frozen=True)
class FunctionExporter:
    run: Callable[[ExportJob], dict[str, Any]]
    accepts: frozenset[str] = frozenset()

    def __call__(self, job: ExportJob) -> dict[str, Any]:
        return self.run(job)


FORMATS: Registry[Exporter] = Registry("export format")


def register_format(
    name: str, accepts: Iterable[str] = ()
) -> Callable[[Callable[[ExportJob], dict]], Callable]:
    """Register a function ``job -> summary`` as format ``name`` reading the options ``accepts``."""

    def decorator(fn: Callable[[ExportJob], dict[str, Any]]) -> Callable[[ExportJob], dict[str, Any]]:
        FORMATS.register(name)(FunctionExporter(fn, frozenset(accepts)))
        return fn

    return decorator


def safe_file_name(image_id: Any, suffix: str) -> str:
    """``<image_id><suffix>``, refusing anything that is not a plain name (ids come from tar
    member names, which must never become paths)."""
    name = f"{image_id}{suffix}"
    if Path(name).name != name or name.startswith(".") or "\\" in name:
        raise StoreError(f"image id {image_id!r} cannot be used as a file name")
    return name


@contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a hidden temporary file next to ``path``; rename it over ``path`` on success."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: Any) -> None:
    with atomic_open(path) as handle:
        handle.write(json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def dense_verified(row: Row) -> bool:
    return bool((row.get("dense_caption") or {}).get("verified"))


@dataclass(frozen=True)
class PerImageJson:
    """The exporter kind of one JSON document per ok image, ``<folder>/<image_id>.json`` under
    ``--to``; ``--only-verified`` skips (and counts) images whose dense caption is not verified."""

    document: Callable[[Row, int], Document]
    folder: str = ""  # "" = ``--to`` itself
    accepts: frozenset[str] = frozenset({"only_verified"})

    def __call__(self, job: ExportJob) -> dict[str, Any]:
        folder = job.target / self.folder
        folder.mkdir(parents=True, exist_ok=True)
        shared = job.shared_ids()
        if shared:
            logger.warning(
                "%d image id(s) occur in more than one shard (e.g. %s); each copy is written as "
                "<image_id>__<shard>.json", len(shared), next(iter(shared)),
            )
        written, names = 0, set()
        duplicates: dict[str, list[str]] = {}
        for unit, rows in job.shards():
            for row in rows:
                job.counts["rows:ok"] += 1
                if job.options.only_verified and not dense_verified(row):
                    job.counts["images:unverified"] += 1
                    continue
                image_id = row["image_id"]
                stem = image_id if image_id not in shared else _copy_stem(image_id, unit, shared[image_id])
                name = safe_file_name(stem, ".json")
                if name in names:  # e.g. an id that is itself "<id>__<shard>": refuse, never overwrite
                    raise StoreError(f"two exported images would both be written as {folder / name}")
                names.add(name)
                write_json_atomic(folder / name, self.document(row, job.level))
                written += 1
                if image_id in shared:
                    job.counts["images:duplicate_id"] += 1
                    duplicates.setdefault(image_id, []).append(name)
        where = f"{self.folder}/" if self.folder else ""
        return {
            "exported": written,
            "unit": "image(s)",
            "layout": {
                f"{where}<image_id>.json": "one document per image",
                f"{where}<image_id>__<shard>.json": "an image id that more than one shard holds: one per shard",
            },
            "duplicate_ids": duplicates,
        }


def _copy_stem(image_id: str, unit: str, units: list[str]) -> str:
    """``<image_id>__<shard>`` for one copy of a shared id (never a silent overwrite); the unit id
    stands in for the shard when one shard holds the id in two units."""
    shard = split_unit_id(unit)[0]
    same_shard = sum(1 for u in units if split_unit_id(u)[0] == shard) > 1
    return f"{image_id}__{unit if same_shard else shard}"


def load_formats() -> Registry[Exporter]:
    """Every format: the core ones outside this file, then the add-ons' entry points."""
    import grand_pipeline.export_ref  # noqa: F401  (registers grand-json, grand-ref; imports this module)

    plugins.load(plugins.EXPORT_FORMATS)
    return FORMATS


def highest_committed_level(store: Store) -> int:
    """The highest level with at least one committed shard; StoreError when there is none."""
    for level in sorted(store.levels_present(), reverse=True):
        if store.committed(level):
            return level
    raise StoreError(f"nothing is committed in {store.uri}: run `grand run` first")


def export(output_uri: str, fmt: str, to_dir: str, options: ExportOptions | None = None) -> dict[str, Any]:
    """Export the committed output at ``output_uri`` as ``fmt`` into ``to_dir``; returns the
    summary (also written to :func:`summary_path`)."""
    options = options or ExportOptions()
    exporter = load_formats().get(fmt)  # unknown format: UnknownNameError listing the known ones
    unread = [FLAGS[name] for name in options.given() if name not in exporter.accepts]
    if unread:
        raise ConfigError(f"{', '.join(unread)}: not an option of export format {fmt!r}")
    store = Store(output_uri)
    level = highest_committed_level(store)
    target = Path(to_dir)
    if target.exists() and not target.is_dir():
        raise StoreError(f"--to {to_dir} is a file: export into a folder")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"--to {to_dir}: cannot create the folder: {exc.strerror or exc}") from None
    if level < 4:
        logger.warning("exporting level %d of %s: level 4 is not committed yet", level, output_uri)
    missing = set().union(*(store.committed(lvl) for lvl in range(1, level))) - set(store.committed(level))
    if missing:
        logger.warning(
            "%d shard(s) are committed below level %d only and are not exported", len(missing), level
        )
    summary_file = summary_path(target)
    # The summary marks a finished export; a previous one must not vouch for this one meanwhile.
    summary_file.unlink(missing_ok=True)
    job = ExportJob(store, level, target, options)
    result = exporter(job)
    summary = {
        "format": fmt,
        "output": output_uri,
        "level": level,
        "options": asdict(options),
        **result,
        "counts": dict(sorted(job.counts.items())),
        "skipped": len(job.skipped),
        "skipped_images": job.skipped,
    }
    summary_file.parent.mkdir(exist_ok=True)
    write_json_atomic(summary_file, summary)
    logger.info(
        "exported %d %s of level %d to %s; %d error row(s) skipped",
        summary["exported"],
        summary["unit"],
        level,
        to_dir,
        len(job.skipped),
    )
    return summary
