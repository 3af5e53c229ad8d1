"""LevelRunner: one level's stages, built once per actor, applied to whole shards.

The runner is what a Ray actor (or the local executor) holds. ``run_shard`` streams a shard's
images through micro-batches and returns the level's Arrow table in source order, plus stats
for the commit marker. It never writes: committing is the driver's job.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from grand_pipeline.config import GrandConfig
from grand_pipeline.engine.inputs import micro_batches, record_from_source
from grand_pipeline.metrics import PipelineMetrics
from grand_pipeline.models.hub import ModelHub
from grand_pipeline.schemas import COMMON_FIELDS, STATUS_OK, level_schema
from grand_pipeline.sources import iter_shard
from grand_pipeline.sources.base import ShardRef
from grand_pipeline.stage import ImageRecord
from grand_pipeline.store import Store

logger = logging.getLogger(__name__)


def level_spec(level: int):
    import levels  # noqa: F401 - registers the built-in levels
    from levels.base import LEVELS

    return LEVELS.get(str(level))


class LevelRunner:
    def __init__(self, cfg: GrandConfig, level: int, metrics: PipelineMetrics | None = None) -> None:
        import torch

        # Float results of some kernels depend on the thread count, so it is fixed from config:
        # the same config gives the same bytes whether the shard ran locally or in an actor.
        torch.set_num_threads(cfg.engine.torch_threads or max(1, round(cfg.pool(level).num_cpus)))
        self.cfg = cfg
        self.level = level
        self.spec = level_spec(level)
        self.metrics = metrics or PipelineMetrics()
        self.hub = ModelHub(cfg.models, cfg.plugins)
        # Models load here, once per actor: every stage asks the shared hub.
        self.stages = [stage_cls(cfg, self.hub) for stage_cls in self.spec.stages]
        self.config_hash = cfg.content_hash()
        common = {f.name for f in COMMON_FIELDS}
        #: Columns of level N-1 that level N copies forward unless its stages replace them.
        self.carried = [f.name for f in level_schema(level - 1) if f.name not in common] if level > 1 else []

    def models(self) -> dict[str, dict[str, Any]]:
        return self.hub.loaded()

    def _records(self, ref: ShardRef, output_uri: str) -> Iterator[ImageRecord]:
        max_pixels = self.cfg.level1.max_image_pixels
        if self.level == 1:
            for item in iter_shard(ref):
                yield record_from_source(item, max_pixels)
            return
        previous = Store(output_uri).read(self.level - 1, ref.shard_id).to_pylist()
        sources = {}
        if self.spec.needs_pixels:
            sources = {item.image_id: item for item in iter_shard(ref)}
        for row in previous:
            source = sources.get(row["image_id"])
            if source is not None:
                record = record_from_source(source, max_pixels)
            else:
                record = ImageRecord(image_id=row["image_id"], shard_id=row["shard_id"])
                if self.spec.needs_pixels:
                    record.fail("read", "image no longer in the source shard")
            record.file_name, record.width, record.height = row["file_name"], row["width"], row["height"]
            # Rows are cumulative: everything level N-1 wrote travels on in ``fields``.
            record.fields.update({name: row[name] for name in self.carried})
            record.fields["prompt_versions"] = list(row["provenance"]["prompt_versions"] or [])
            record.backends = list(row["provenance"]["backends"] or [])
            if row["status"] != STATUS_OK:
                record.fail(row["error_stage"] or "previous", f"level {self.level - 1}: {row['error']}")
            elif self.spec.from_previous is not None:
                self.spec.from_previous(record, row)
            yield record

    def run_shard(
        self, ref: ShardRef, output_uri: str, only: set[str] | None = None
    ) -> tuple[pa.Table, dict[str, Any]]:
        """The level's table for ``ref``; with ``only``, just the rows of those image ids
        (``grand retry-failed``), in source order."""
        start = time.perf_counter()
        started = time.time()
        before = self.metrics.stage_seconds.copy()
        llm_before = self.metrics.llm_counts_for(self.level)
        rows: list[dict[str, Any]] = []
        micro = self.cfg.pool(self.level).micro_batch

        def hook(stage: str, ok: int, failed: int, seconds: float) -> None:
            self.metrics.stage_done(self.level, stage, ok, failed, seconds)

        records = self._records(ref, output_uri)
        if only is not None:
            records = (record for record in records if record.image_id in only)
        for batch in micro_batches(records, micro):
            with self.metrics.active(self.level):  # LLM attempts count against this level
                for stage in self.stages:
                    stage(batch, hook)
            rows.extend(self._row(record) for record in batch)
            for record in batch:
                record.image = None  # free pixels as soon as the batch is done
        table = pa.Table.from_pylist(rows, schema=self.spec.schema)
        stage_seconds = {
            stage: round(seconds - before[(lvl, stage)], 4)
            for (lvl, stage), seconds in self.metrics.stage_seconds.items()
            if lvl == self.level
        }
        stats = {
            "seconds": round(time.perf_counter() - start, 3),
            "stage_seconds": stage_seconds,
            # Wall-clock bounds and the host that computed the shard (the marker's img2dataset-style
            # fields); the committing driver may run elsewhere.
            "started": round(started, 3),
            "finished": round(time.time(), 3),
            "host": platform.node(),
            "models": self.models(),
            "config_hash": self.config_hash,
        }
        # Per-shard LLM attempts and failed checks, for the markers (and so the dashboard).
        for key, counts in self.metrics.llm_counts_for(self.level).items():
            delta = {k: n - llm_before[key].get(k, 0) for k, n in counts.items()}
            stats[key] = {k: n for k, n in delta.items() if n}
        return table, stats

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
