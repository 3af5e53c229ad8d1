"""LevelRunner: one level's stages, built once per actor, applied to one sub-shard unit at a time.

The runner is what a Ray actor (or the local executor) holds. ``run_unit`` streams a unit's
images through micro-batches, in source order, plus stats for the commit marker. Given the run's
attempt it streams the rows into the unit's staging Parquet (``commit.stage_writer``); otherwise it
returns the Arrow table (``grand retry-failed`` splices it). Publishing is the driver's job.

Memory follows the micro-batch: Level 1 streams the unit's bytes from the tar; later levels read
the previous level's rows a Parquet row group at a time, in lock step with the unit's source
items (only when the level needs pixels), and each finished micro-batch goes to the writer.
A thread reads and decodes the next micro-batch while the current one runs on the models.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from grand_pipeline.commit import stage_writer
from grand_pipeline.config import GrandConfig
from grand_pipeline.engine.inputs import micro_batches, record_from_source
from grand_pipeline.engine.prefetch import prefetched
from grand_pipeline.metrics import PipelineMetrics
from grand_pipeline.models.hub import ModelHub
from grand_pipeline.schemas import COMMON_FIELDS, STATUS_OK, level_schema
from grand_pipeline.sources import iter_unit_items
from grand_pipeline.sources.base import SourceImage
from grand_pipeline.stage import ImageRecord
from grand_pipeline.store import Store
from grand_pipeline.unit_writer import StagedUnit
from grand_pipeline.units import UnitRef

logger = logging.getLogger(__name__)

MISSING_SOURCE = "image listed in the shard index is no longer in the source shard"


class StartupFailed(RuntimeError):
    """A model failed its start-up probe: the run stops with this one line, before any unit."""


class UnitFailed(RuntimeError):
    """The unit must not be committed (every LLM call failed): the driver retries it."""


def level_spec(level: int):
    import levels  # noqa: F401 - registers the built-in levels
    from levels.base import LEVELS

    return LEVELS.get(str(level))


class LevelRunner:
    def __init__(self, cfg: GrandConfig, level: int, metrics: PipelineMetrics | None = None) -> None:
        import torch

        # Float results of some kernels depend on the thread count, so it is fixed from config:
        # the same config gives the same bytes whether the unit ran locally or in an actor.
        torch.set_num_threads(cfg.engine.torch_threads or max(1, round(cfg.pool(level).num_cpus)))
        self.cfg = cfg
        self.level = level
        self.spec = level_spec(level)
        self.metrics = metrics or PipelineMetrics()
        self.hub = ModelHub(cfg.models, cfg.plugins)
        # Models load here, once per actor: every stage asks the shared hub.
        self.stages = [stage_cls(cfg, self.hub) for stage_cls in self.spec.stages]
        # One tiny call through each model that can fail at run time only (an LLM without a chat
        # template, a vLLM that cannot start): a broken model stops the run here, before any unit.
        for stage in self.stages:
            try:
                stage.startup_check()
            except Exception as exc:  # noqa: BLE001 - any failure of the probe stops the run
                raise StartupFailed(f"level {level} stage {stage.name}: {exc}") from exc
        self.config_hash = cfg.content_hash()
        common = {f.name for f in COMMON_FIELDS}
        #: Columns of level N-1 that level N copies forward unless its stages replace them.
        self.carried = [f.name for f in level_schema(level - 1) if f.name not in common] if level > 1 else []

    def models(self) -> dict[str, dict[str, Any]]:
        return self.hub.loaded()

    def _source_records(self, unit: UnitRef, wanted: tuple[str, ...]) -> Iterator[ImageRecord]:
        """Level 1: the unit's items, decoded; an indexed id the source no longer has is an error row."""
        max_pixels = self.cfg.level1.max_image_pixels
        seen: set[str] = set()
        for item in iter_unit_items(unit.shard, wanted, unit.start):
            seen.add(item.image_id)
            yield record_from_source(item, max_pixels)
        for image_id in wanted:
            if image_id not in seen:
                record = ImageRecord(image_id=image_id, shard_id=unit.shard_id)
                record.fail("read", MISSING_SOURCE)
                yield record

    def _carried_records(
        self, unit: UnitRef, output_uri: str, only: set[str] | None
    ) -> Iterator[ImageRecord]:
        """Levels 2+: the previous level's rows of this unit, a row group at a time, joined in
        order with the unit's source items when the level needs pixels."""
        store = Store(output_uri)
        previous = unit.unit_id
        # Level 1 wrote one row per indexed id, so the unit's ids are the previous level's ids.
        ids = [i for i in unit.image_ids if only is None or i in only]
        sources: Iterator[SourceImage] = iter(())
        if self.spec.needs_pixels:
            sources = iter_unit_items(unit.shard, ids, unit.start)
        ahead: dict[str, SourceImage] = {}  # items met before their row (never in a normal shard)
        max_pixels = self.cfg.level1.max_image_pixels
        try:
            for batch in store.iter_batches(self.level - 1, previous):
                for row in batch.to_pylist():
                    if only is not None and row["image_id"] not in only:
                        continue
                    source = _take(row["image_id"], ahead, sources) if self.spec.needs_pixels else None
                    if source is not None:
                        record = record_from_source(source, max_pixels)
                    else:
                        record = ImageRecord(image_id=row["image_id"], shard_id=row["shard_id"])
                        if self.spec.needs_pixels:
                            record.fail("read", "image no longer in the source shard")
                    self._carry(record, row)
                    yield record
        finally:
            close = getattr(sources, "close", None)
            if close is not None:
                close()

    def _carry(self, record: ImageRecord, row: dict[str, Any]) -> None:
        record.file_name, record.width, record.height = row["file_name"], row["width"], row["height"]
        # Rows are cumulative: everything level N-1 wrote travels on in ``fields``.
        record.fields.update({name: row[name] for name in self.carried})
        record.fields["prompt_versions"] = list(row["provenance"]["prompt_versions"] or [])
        record.backends = list(row["provenance"]["backends"] or [])
        if row["status"] != STATUS_OK:
            record.fail(row["error_stage"] or "previous", f"level {self.level - 1}: {row['error']}")
        elif self.spec.from_previous is not None:
            self.spec.from_previous(record, row)

    def run_unit(
        self, unit: UnitRef, output_uri: str, only: set[str] | None = None, attempt: int | None = None
    ) -> tuple[pa.Table | StagedUnit, dict[str, Any]]:
        """The level's rows for ``unit``, in source order; with ``only``, just the rows of those
        image ids (``grand retry-failed``).

        With ``attempt`` the rows are streamed into the unit's staging Parquet of that attempt and
        the :class:`StagedUnit` is returned (memory follows the micro-batch; the driver publishes
        it); without, the Arrow table is returned.
        """
        start = time.perf_counter()
        started = time.time()
        before = self.metrics.stage_seconds.copy()
        llm_before = self.metrics.llm_counts_for(self.level)
        parts: list[pa.Table] = []
        writer = None if attempt is None else stage_writer(Store(output_uri), self.level, unit.unit_id, attempt)
        micro = self.cfg.pool(self.level).micro_batch
        first_error: str | None = None
        llm_stages = {stage.name for stage in self.stages if "llm" in stage.models}
        llm_rows = llm_failed = 0  # rows that reached an LLM stage, and those it failed

        def hook(stage: str, ok: int, failed: int, seconds: float) -> None:
            self.metrics.stage_done(self.level, stage, ok, failed, seconds)

        if self.level == 1:
            wanted = unit.image_ids if only is None else tuple(i for i in unit.image_ids if i in only)
            records = self._source_records(unit, wanted)
        else:
            records = self._carried_records(unit, output_uri, only)
        try:
            for batch in prefetched(micro_batches(records, micro), self.cfg.engine.prefetch_batches):
                self._run_batch(batch, hook, parts, writer)
                for record in batch:
                    if record.ok or record.error_stage in llm_stages:
                        llm_rows += 1
                    if record.error_stage in llm_stages:
                        llm_failed += 1
                        first_error = first_error or record.error
            if llm_stages and llm_rows and llm_failed == llm_rows:
                # Every row that reached the LLM failed there: a broken model, not bad images.
                # Raising makes the driver retry the unit and, once the budget is spent, exit 1.
                raise UnitFailed(f"unit {unit.unit_id}: the LLM failed on all {llm_rows} row(s): {first_error}")
            result = writer.close() if writer is not None else (
                pa.concat_tables(parts) if parts else self.spec.schema.empty_table()
            )
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        stage_seconds = {
            stage: round(seconds - before[(lvl, stage)], 4)
            for (lvl, stage), seconds in self.metrics.stage_seconds.items()
            if lvl == self.level
        }
        stats = {
            "seconds": round(time.perf_counter() - start, 3),
            "stage_seconds": stage_seconds,
            # Wall-clock bounds and the host that computed the unit (the marker's img2dataset-style
            # fields); the committing driver may run elsewhere.
            "started": round(started, 3),
            "finished": round(time.time(), 3),
            "host": platform.node(),
            "models": self.models(),
            "config_hash": self.config_hash,
        }
        # Per-unit LLM attempts and failed checks, for the markers (and so the dashboard).
        for key, counts in self.metrics.llm_counts_for(self.level).items():
            delta = {k: n - llm_before[key].get(k, 0) for k, n in counts.items()}
            stats[key] = {k: n for k, n in delta.items() if n}
        return result, stats

    def _run_batch(self, batch: list[ImageRecord], hook: Any, parts: list[pa.Table], writer: Any) -> None:
        for stage in self.stages:
            stage(batch, hook)
        for record in batch:  # what the LLM stages tried, handed over on the record
            self.metrics.count_attempts(self.level, record.fields)
        table = pa.Table.from_pylist([self._row(record) for record in batch], schema=self.spec.schema)
        if writer is not None:
            writer.write(table)
        else:
            parts.append(table)
        for record in batch:
            record.image = None  # free pixels as soon as the batch is done

    def _row(self, record: ImageRecord) -> dict[str, Any]:
        row = {
            "image_id": record.image_id,
            "shard_id": record.shard_id,
            "file_name": record.file_name,
            "width": record.width,
            "height": record.height,
            "status": record.status,
            "error": record.error,
            "error_stage": record.error_stage,
            "provenance": {
                "config_hash": self.config_hash,
                "backends": record.backends,
                "prompt_versions": record.fields.get("prompt_versions", []),
            },
        }
        row.update({name: record.fields.get(name) for name in self.carried})
        row.update(self.spec.to_row(record))
        return row


def _take(image_id: str, ahead: dict[str, SourceImage], sources: Iterator[SourceImage]) -> SourceImage | None:
    """The source item of ``image_id``: rows and items come in the same order, so this reads at
    most up to that item; anything met before it waits in ``ahead``."""
    if image_id in ahead:
        return ahead.pop(image_id)
    for item in sources:
        if item.image_id == image_id:
            return item
        ahead[item.image_id] = item
    return None

