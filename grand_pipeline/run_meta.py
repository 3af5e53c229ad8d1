"""What a run records about itself under ``OUT/_run/``, beside the committed units.

- ``config.yaml`` + ``run.json``: the resolved config and the run's identity (hash, profile,
  input, levels, models), rewritten by each attempt;
- ``shards.json``: the input shards the run knows (overall and per level) and each shard's number
  of units, so ``grand status`` counts units without reading every index;
- ``units/{shard}.json``: the shard's :class:`~grand_pipeline.units.ShardIndex` (the split into
  units), stored by Level 1 and read by every later level, retry and export;
- ``attempts/{n:06d}.json``: attempt numbers, taken by exclusive create (:mod:`grand_pipeline.fencing`).

Every file is written through :meth:`Store.write_atomic`, so a reader sees the old or the new
version whole. :class:`RunMeta` holds no state of its own: two of them on one store agree.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from grand_pipeline import fencing
from grand_pipeline.store import RUN_DIR, Store, StoreError, check_level, check_shard_id
from grand_pipeline.units import ShardIndex, UnitError

logger = logging.getLogger(__name__)

UNITS_DIR = "units"


class RunMeta:
    """The ``_run/`` records of ``store``'s output."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def _path(self, *parts: str) -> str:
        return self.store.path(RUN_DIR, *parts)

    def _read_json(self, path: str) -> Any:
        raw = self.store.read_bytes(path)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            logger.warning("ignoring unparseable %s", path)
            return None

    def _write_json(self, path: str, doc: Any, indent: int | None = 1) -> None:
        self.store.write_atomic(path, json.dumps(doc, sort_keys=True, indent=indent).encode())

    # ---- config and identity -----------------------------------------------------------------
    def write_run_meta(self, config_yaml: str, run_info: dict) -> None:
        self.store.write_atomic(self._path("config.yaml"), config_yaml.encode())
        self._write_json(self._path("run.json"), run_info)

    def read_run_meta(self) -> dict | None:
        """The ``run.json`` written by :meth:`write_run_meta`, or None."""
        data = self._read_json(self._path("run.json"))
        return data if isinstance(data, dict) else None

    def read_config_yaml(self) -> str | None:
        raw = self.store.read_bytes(self._path("config.yaml"))
        return raw.decode() if raw is not None else None

    def next_attempt(self) -> int:
        """Take an attempt number for this process (unique even when two drivers start at once);
        it also becomes ``store.attempt``, the tag of the store's staging files."""
        self.store.attempt = fencing.take_attempt(self.store.fs, self._path())
        return self.store.attempt

    # ---- known shards and their unit counts --------------------------------------------------
    def _shards_doc(self) -> dict:
        data = self._read_json(self._path("shards.json"))
        if not isinstance(data, dict):
            return {"shards": [], "by_level": {}, "units": {}}
        return {
            "shards": list(data.get("shards", [])),
            "by_level": dict(data.get("by_level", {})),
            "units": dict(data.get("units", {})),
        }

    def record_shards(self, level: int | None, shard_ids: list[str]) -> None:
        """Add ``shard_ids`` to the run's known input shards (and to ``level``'s, if given)."""
        ids = {check_shard_id(s) for s in shard_ids}
        doc = self._shards_doc()
        doc["shards"] = sorted(set(doc["shards"]) | ids)
        if level is not None:
            key = str(check_level(level))
            doc["by_level"][key] = sorted(set(doc["by_level"].get(key, [])) | ids)
        self._write_json(self._path("shards.json"), doc)

    def record_units(self, shard: str, count: int) -> None:
        """Remember how many units ``shard`` has (``status`` reads counts, never whole indexes)."""
        doc = self._shards_doc()
        doc["units"][check_shard_id(shard)] = int(count)
        self._write_json(self._path("shards.json"), doc)

    def unit_counts(self) -> dict[str, int]:
        return dict(self._shards_doc()["units"])

    def known_shards(self, level: int | None = None) -> list[str]:
        """The run's known shards; for ``level``, its own list when one was recorded."""
        doc = self._shards_doc()
        if level is not None and str(level) in doc["by_level"]:
            return list(doc["by_level"][str(level)])
        return doc["shards"]

    # ---- shard indexes (the split into units) ------------------------------------------------
    def _index_path(self, shard: str) -> str:
        return self._path(UNITS_DIR, f"{check_shard_id(shard)}.json")

    def read_index(self, shard: str) -> ShardIndex | None:
        """The stored index of ``shard``, or None before its first Level-1 run."""
        doc = self._read_json(self._index_path(shard))
        if doc is None:
            return None
        try:
            return ShardIndex.from_doc(doc, shard)
        except UnitError as exc:
            raise StoreError(str(exc)) from None

    def write_index(self, index: ShardIndex) -> None:
        """Store ``index`` and record its unit count."""
        self._write_json(self._index_path(index.shard_id), index.to_doc(), indent=None)
        self.record_units(index.shard_id, index.num_units)

    def drop_index(self, shard: str) -> None:
        self.store.remove(self._index_path(shard))
