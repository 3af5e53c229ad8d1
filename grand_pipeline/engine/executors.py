"""Executors: where a (level, unit) runs. ``local`` runs in-process; ``ray`` uses one actor pool
per level, sized and placed from ``cfg.pools["levelN"]``.

Both expose the same three calls to the driver: ``capacity(level)``, ``submit(level, unit)`` and
``wait()``, which returns finished ``Outcome``s. A unit whose actor died comes back with
``actor_died=True``; the Ray pool has already replaced that actor by then. A runner that fails its
start-up probe (:class:`StartupFailed`) is not retried: it is raised to the driver.
"""

from __future__ import annotations

import logging
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from grand_pipeline.config import GrandConfig
from grand_pipeline.engine.runner import LevelRunner, StartupFailed
from grand_pipeline.metrics import PipelineMetrics
from grand_pipeline.registry import Registry
from grand_pipeline.unit_writer import StagedUnit
from grand_pipeline.units import UnitRef

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    level: int
    unit: UnitRef
    result: pa.Table | StagedUnit | None = None
    """The unit's rows: staged by the actor (``attempt`` given) or an in-memory table."""
    stats: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    actor_died: bool = False


class Executor:
    """``attempt`` tags the staging files units are streamed into; ``log_level`` is the logging
    level of worker processes (Ray actors), which do not share the driver's logging."""

    metrics: PipelineMetrics

    def __init__(
        self, cfg: GrandConfig, output_uri: str, attempt: int | None = None, log_level: str = "WARNING"
    ) -> None:
        self.cfg = cfg
        self.output_uri = output_uri
        self.attempt = attempt
        self.log_level = log_level

    def capacity(self, level: int) -> int:
        raise NotImplementedError

    def submit(self, level: int, unit: UnitRef) -> None:
        raise NotImplementedError

    def wait(self) -> list[Outcome]:
        raise NotImplementedError

    def in_flight(self, level: int) -> int:
        raise NotImplementedError

    def release(self, level: int) -> None:
        """Free the resources of ``level``'s pool; called once the level has no more work."""
        return None

    def shutdown(self) -> None:
        return None


EXECUTORS: Registry[type[Executor]] = Registry("executor")


@EXECUTORS.register("local")
class LocalExecutor(Executor):
    """Runs each unit synchronously in this process; for debugging and small jobs."""

    def __init__(
        self, cfg: GrandConfig, output_uri: str, attempt: int | None = None, log_level: str = "WARNING"
    ) -> None:
        super().__init__(cfg, output_uri, attempt, log_level)  # in-process: the driver's logging
        self.metrics = PipelineMetrics()
        self._runners: dict[int, LevelRunner] = {}
        self._done: deque[Outcome] = deque()

    def capacity(self, level: int) -> int:
        return 1

    def in_flight(self, level: int) -> int:
        return 0

    def submit(self, level: int, unit: UnitRef) -> None:
        if level not in self._runners:
            self._runners[level] = LevelRunner(self.cfg, level, self.metrics)  # StartupFailed: fatal
        try:
            result, stats = self._runners[level].run_unit(unit, self.output_uri, attempt=self.attempt)
            self._done.append(Outcome(level, unit, result, stats))
        except Exception as exc:  # noqa: BLE001 - reported to the driver, which retries
            logger.debug("unit %s level %d failed:\n%s", unit.unit_id, level, traceback.format_exc())
            self._done.append(Outcome(level, unit, error=f"{type(exc).__name__}: {exc}"))

    def wait(self) -> list[Outcome]:
        done = list(self._done)
        self._done.clear()
        return done

    def release(self, level: int) -> None:
        self._runners.pop(level, None)  # its models go with it


class _LevelActor:
    """The body of a Ray actor: a LevelRunner whose models load once, in the constructor."""

    def __init__(self, cfg: GrandConfig, level: int, log_level: str) -> None:
        # An actor is a fresh process: `grand run -v` reaches it as ``log_level`` (INFO).
        logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
        self.runner = LevelRunner(cfg, level, PipelineMetrics(ray_enabled=True))

    def ready(self) -> bool:
        return True

    def run_unit(
        self, unit: UnitRef, output_uri: str, attempt: int | None
    ) -> tuple[pa.Table | StagedUnit, dict[str, Any]]:
        return self.runner.run_unit(unit, output_uri, attempt=attempt)


@EXECUTORS.register("ray")
class RayExecutor(Executor):
    """One actor pool per level with bounded in-flight units per actor (backpressure)."""

    def __init__(
        self, cfg: GrandConfig, output_uri: str, attempt: int | None = None, log_level: str = "WARNING"
    ) -> None:
        import ray

        super().__init__(cfg, output_uri, attempt, log_level)
        self.ray = ray
        if not ray.is_initialized():
            # Token authentication is Ray's default for local clusters; we never turn it off.
            ray.init(
                address=cfg.engine.ray_address,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=True,
            )
            self._owns_ray = True
        else:
            self._owns_ray = False
        self.metrics = PipelineMetrics(ray_enabled=True)
        self._actor_cls = ray.remote(_LevelActor)
        self._actors: dict[int, list[Any]] = {}
        self._load: dict[int, list[int]] = {}
        self._pending: dict[Any, tuple[int, int, UnitRef]] = {}

    def _new_actor(self, level: int) -> Any:
        pool = self.cfg.pool(level)
        options: dict[str, Any] = {
            "num_cpus": pool.num_cpus,
            "num_gpus": pool.num_gpus,
            "max_restarts": 0,
            "max_concurrency": 1,
        }
        if pool.resources:
            options["resources"] = dict(pool.resources)
        if pool.accelerator_type:
            options["accelerator_type"] = pool.accelerator_type
        if pool.runtime_env:
            options["runtime_env"] = dict(pool.runtime_env)
        return self._actor_cls.options(**options).remote(self.cfg, level, self.log_level)

    def _pool(self, level: int) -> list[Any]:
        if level not in self._actors:
            size = self.cfg.pool(level).num_actors
            self._actors[level] = [self._new_actor(level) for _ in range(size)]
            self._load[level] = [0] * size
        return self._actors[level]

    def capacity(self, level: int) -> int:
        return self.cfg.pool(level).num_actors * self.cfg.engine.max_in_flight_per_actor

    def in_flight(self, level: int) -> int:
        return sum(self._load.get(level, []))

    def submit(self, level: int, unit: UnitRef) -> None:
        actors = self._pool(level)
        loads = self._load[level]
        index = min(range(len(actors)), key=loads.__getitem__)
        handle = actors[index].run_unit.remote(unit, self.output_uri, self.attempt)
        loads[index] += 1
        self._pending[handle] = (level, index, unit)
        self.metrics.in_flight(level, self.in_flight(level))

    def wait(self) -> list[Outcome]:
        if not self._pending:
            return []
        ready, _ = self.ray.wait(list(self._pending), num_returns=1)
        outcomes = []
        for handle in ready:
            level, index, unit = self._pending.pop(handle)
            self._load[level][index] -= 1
            try:
                result, stats = self.ray.get(handle)
                outcomes.append(Outcome(level, unit, result, stats))
            except self.ray.exceptions.RayActorError as exc:
                startup = _startup_failure(exc)
                if startup is not None:  # the constructor's probe failed: every actor would
                    raise StartupFailed(startup) from None
                logger.warning("actor of level %d died on unit %s; replacing it", level, unit.unit_id)
                self._replace(level, index)
                outcomes.append(Outcome(level, unit, error=f"actor died: {exc}", actor_died=True))
            except self.ray.exceptions.RayTaskError as exc:
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                outcomes.append(Outcome(level, unit, error=f"{type(cause).__name__}: {cause}"))
            self.metrics.in_flight(level, self.in_flight(level))
        return outcomes

    def release(self, level: int) -> None:
        for actor in self._actors.pop(level, []):
            self._kill(actor)
        self._load.pop(level, None)

    def _kill(self, actor: Any) -> None:
        try:
            self.ray.kill(actor)
        except (self.ray.exceptions.RayError, ValueError) as exc:  # already dead, or not an actor handle
            logger.debug("kill of a level actor failed: %s", exc)

    def _replace(self, level: int, index: int) -> None:
        self._kill(self._actors[level][index])
        self._actors[level][index] = self._new_actor(level)

    def shutdown(self) -> None:
        for level in list(self._actors):
            self.release(level)
        if self._owns_ray:
            self.ray.shutdown()


def _startup_failure(exc: BaseException) -> str | None:
    """The one-line reason when an actor died in its constructor's start-up probe."""
    text = str(exc)
    marker = f"{StartupFailed.__name__}: "
    if marker not in text:
        return None
    return text[text.rindex(marker) + len(marker) :].strip().splitlines()[0]
