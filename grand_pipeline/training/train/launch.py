"""Launchers of the training loop: ``local`` (in-process, world 1) and ``ray`` (Ray Train).

Both run :func:`~.loop.train` unchanged; the launcher only decides the ranks and devices. Before
anything starts, :func:`preflight` checks what a user can get wrong in one line each: no
committed level 3, fewer shards than data-parallel readers, a checkpoint of another config, and
(Ray) more workers than the cluster can ever hold; Ray Train would otherwise wait forever.

Ray Train's own storage (``RunConfig.storage_path``) goes to ``OUT/glamm/ray`` on the output's file
system; the checkpoints are the loop's (``OUT/glamm/checkpoints``), so a rerun resumes through the
same code under either launcher, and so do Ray Train's worker-group restarts (``launch.max_failures``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from grand_pipeline.config import ConfigError
from grand_pipeline.registry import Registry
from grand_pipeline.store import Store, StoreError
from grand_pipeline.training.config import LaunchSection, TrainConfig
from grand_pipeline.training.data.rows import committed_shards, training_level

from . import checkpoint as ckpt_io
from .log import read_log
from .loop import TrainResult, WorkerContext, train
from .storage import Location

logger = logging.getLogger(__name__)

OnStep = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Preflight:
    level: int
    shards: int
    checkpoint: str | None
    start_step: int


def preflight(cfg: TrainConfig, output: str) -> Preflight:
    """The checks that need no model and no cluster; raises one-line user errors."""
    store = Store(output)
    level = training_level(store)
    shards = len(committed_shards(store, level))
    readers = cfg.launch.workers * max(1, cfg.data.loader_workers)
    if shards < readers:
        key = "launch.workers" if shards < cfg.launch.workers else "data.loader_workers"
        raise ConfigError(
            f"{key}: {cfg.launch.workers} worker(s) x {max(1, cfg.data.loader_workers)} loader worker(s) "
            f"read whole shards, but {output} has {shards} committed level-{level} shard(s)"
        )
    uri = ckpt_io.latest(output)
    start = 0
    if uri is not None:
        record = ckpt_io.read_marker(uri)
        ckpt_io.check_config(uri, str(record.get("config_hash")), cfg.content_hash())
        start = int(record["step"])
    return Preflight(level, shards, uri, start)


class Launcher:
    """Checks everything in the constructor (:func:`preflight`, then the launcher's own), so a
    caller can show progress only once the run can start; :meth:`run` trains. ``log_level`` is
    the logging level of worker processes (Ray Train's), which do not share the caller's logging."""

    def __init__(self, cfg: TrainConfig, output: str, log_level: str = "WARNING") -> None:
        self.cfg, self.output, self.log_level = cfg, output, log_level
        self.preflight = preflight(cfg, output)

    def run(self, on_step: OnStep | None = None) -> TrainResult:
        """Train to ``optim.total_steps``; a run already there starts nothing."""
        start, total = self.preflight.start_step, self.cfg.optim.total_steps
        if start >= total:
            return TrainResult(start, total, None, self.preflight.checkpoint)
        return self._train(on_step)

    def _train(self, on_step: OnStep | None) -> TrainResult:
        raise NotImplementedError

    def close(self) -> None:
        """Give back what the constructor took (a Ray session it started)."""

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


LAUNCHERS: Registry[type[Launcher]] = Registry("executor")


def open_launcher(cfg: TrainConfig, output: str, log_level: str = "WARNING") -> Launcher:
    """The checked launcher of ``cfg.launch.executor`` (use it as a context manager)."""
    return LAUNCHERS.get(cfg.launch.executor)(cfg, output, log_level)


def launch(cfg: TrainConfig, output: str, on_step: OnStep | None = None) -> TrainResult:
    """Check, then train with ``cfg.launch.executor``."""
    with open_launcher(cfg, output) as launcher:
        return launcher.run(on_step)


@LAUNCHERS.register("local")
class LocalLauncher(Launcher):
    """In-process, world size 1, on CPU or the first GPU."""

    def __init__(self, cfg: TrainConfig, output: str, log_level: str = "WARNING") -> None:
        super().__init__(cfg, output, log_level)
        if cfg.launch.use_gpu and not torch.cuda.is_available():
            raise ConfigError("launch.use_gpu: no CUDA device in this process")
        self.device = torch.device("cuda", 0) if cfg.launch.use_gpu else torch.device("cpu")

    def _train(self, on_step: OnStep | None) -> TrainResult:
        return train(self.cfg, self.output, WorkerContext(0, 1, self.device), on_step)


# ---------------------------------------------------------------------------------------- Ray
def worker_resources(launch: LaunchSection) -> dict[str, float]:
    """What one Ray Train worker asks for."""
    wanted = {"CPU": 1.0, **{k: float(v) for k, v in launch.resources_per_worker.items()}}
    if launch.use_gpu:
        wanted["GPU"] = 1.0
    return wanted


def check_capacity(launch: LaunchSection, cluster: dict[str, float]) -> None:
    """Refuse a worker group the cluster can never hold (Ray Train would wait for it forever)."""
    for name, amount in sorted(worker_resources(launch).items()):
        need, have = amount * launch.workers, float(cluster.get(name, 0.0))
        if need > have:
            raise ConfigError(
                f"launch.workers: {launch.workers} worker(s) x {amount:g} {name} need {need:g} {name}, "
                f"the Ray cluster has {have:g}; lower --workers or launch.resources_per_worker"
            )


def _ray_worker(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: the process group is up; run the loop."""
    import ray.train
    import ray.train.torch

    logging.basicConfig(level=config["log_level"], format="%(levelname)s %(name)s: %(message)s")
    context = ray.train.get_context()
    ctx = WorkerContext(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device(),
                        context.get_local_rank())
    train(config["cfg"], config["output"], ctx)


def _storage(output: str) -> tuple[str, Any]:
    """Ray Train's ``storage_path`` and ``storage_filesystem``: under the output, through fsspec."""
    where = Location.of(output).child("glamm", "ray")
    if where.local:
        return where.root, None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return where.root, PyFileSystem(FSSpecHandler(where.fs))


def _user_error(exc: BaseException) -> BaseException | None:
    """A user error raised inside a worker, found through Ray's wrappers."""
    failures = getattr(exc, "worker_failures", None) or {}
    for failure in failures.values():
        seen: BaseException | None = failure
        while seen is not None:
            if isinstance(seen, ConfigError | StoreError):
                return seen
            seen = getattr(seen, "cause", None) or seen.__cause__
    return None


def _follow(output: str, start: int, on_step: OnStep, stop: threading.Event) -> None:
    """Feed ``on_step`` from the log rank 0 writes (the workers run elsewhere)."""
    seen = start
    while True:
        done = stop.wait(1.0)
        for record in read_log(output):
            if record["step"] > seen:
                seen = record["step"]
                on_step(record)
        if done:
            return


@LAUNCHERS.register("ray")
class RayLauncher(Launcher):
    """Ray Train's ``TorchTrainer`` with ``launch.workers`` workers (gloo on CPU, NCCL on GPUs)."""

    def __init__(self, cfg: TrainConfig, output: str, log_level: str = "WARNING") -> None:
        import ray

        super().__init__(cfg, output, log_level)
        self.owns = not ray.is_initialized()
        if self.owns:  # token authentication is Ray's default for local clusters; it stays on
            ray.init(address=cfg.launch.ray_address, include_dashboard=False, logging_level=logging.WARNING)
        try:
            check_capacity(cfg.launch, ray.cluster_resources())
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        import ray

        if self.owns and ray.is_initialized():
            ray.shutdown()

    def trainer(self) -> Any:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        cfg = self.cfg
        path, filesystem = _storage(self.output)
        return TorchTrainer(
            _ray_worker,
            train_loop_config={"cfg": cfg, "output": self.output, "log_level": self.log_level},
            torch_config=TorchConfig(backend="nccl" if cfg.launch.use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=cfg.launch.workers,
                use_gpu=cfg.launch.use_gpu,
                resources_per_worker={k: v for k, v in worker_resources(cfg.launch).items() if k != "GPU"},
            ),
            run_config=RunConfig(
                name=f"glamm-{cfg.content_hash()}",
                storage_path=path,
                storage_filesystem=filesystem,
                failure_config=FailureConfig(max_failures=cfg.launch.max_failures),
            ),
        )

    def _train(self, on_step: OnStep | None) -> TrainResult:
        first = self.preflight.start_step
        stop = threading.Event()
        follower = threading.Thread(target=_follow, args=(self.output, first, on_step, stop), daemon=True)
        if on_step is not None:
            follower.start()
        try:
            self.trainer().fit()
        except Exception as exc:
            user = _user_error(exc)
            if user is not None:
                raise user from None
            raise
        finally:
            stop.set()
            if follower.is_alive():
                follower.join()
        log = read_log(self.output)
        last = log[-1] if log and log[-1]["step"] > first else None
        return TrainResult(first, self.cfg.optim.total_steps, last, ckpt_io.latest(self.output))
