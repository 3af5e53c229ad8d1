"""The training loop: plain PyTorch, the same body under every launcher.

AdamW over the parameters that require grad, linear warm-up then linear decay to 0 at
``total_steps``, global-norm clipping, gradient accumulation (DDP's ``no_sync`` on all but the last
micro-batch), bf16 autocast on CUDA and fp32 on CPU. With ``world_size > 1`` the launcher has
initialised ``torch.distributed`` (gloo on CPU, NCCL on GPUs) and the model is wrapped in DDP.

**Exact resume.** Every rank builds the model from the same seed (so the frozen weights agree),
loads the checkpoint's trainable state, optimizer and scheduler, fast-forwards its data stream to
its cursor and, last, restores its RNG states: the steps after a resume compute what an
uninterrupted run computes, so the loss sequence is identical.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from grand_pipeline.training.config import OptimSection, TrainConfig
from grand_pipeline.training.data.collate import Collator
from grand_pipeline.training.data.dataset import GrandGlammDataset

from . import checkpoint as ckpt_io
from .log import TrainLog
from .metrics import TrainMetrics
from .stream import BatchStream

logger = logging.getLogger(__name__)

LOSS_KEYS = ("loss", "ce", "bce", "dice")


@dataclass(frozen=True)
class WorkerContext:
    """This process's place in the run (the launcher fills it in)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    local_rank: int = 0
    """Rank on this node: local rank 0 fills the node's weight cache before the others read it."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class TrainResult:
    start_step: int
    end_step: int
    last: dict[str, Any] | None
    checkpoint: str | None


def lr_factor(step: int, warmup: int, total: int) -> float:
    """LR multiplier for the optimiser step after ``step`` done: (step+1)/warmup while warming
    up, then linear to 0 at ``total`` (the reference's ``WarmupDecayLR`` with linear warm-up)."""
    warm = (step + 1) / max(warmup, 1)
    decay = max(0.0, (total - step) / max(total - warmup, 1))
    return min(warm, decay, 1.0)


def make_optimizer(
    params: list[torch.nn.Parameter], optim: OptimSection
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.AdamW(
        params, lr=optim.lr, betas=(optim.betas[0], optim.betas[1]), weight_decay=optim.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, optim.warmup_steps, optim.total_steps)
    )
    return optimizer, schedule


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(obj: Any, device: torch.device) -> Any:
    """Tensors anywhere in a batch (dicts, lists, tuples) moved to ``device``; the rest as is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def accumulate(
    net: torch.nn.Module, next_batch: Callable[[], dict[str, Any]], accum: int, device: torch.device
) -> torch.Tensor:
    """Forward and backward ``accum`` micro-batches (each loss / ``accum``); DDP all-reduces the
    gradients once, on the last. Returns the float64 means of ``LOSS_KEYS`` over the batches."""
    sums = torch.zeros(len(LOSS_KEYS), dtype=torch.float64)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    for i in range(accum):
        batch = to_device(next_batch(), device)
        sync = i == accum - 1 or not isinstance(net, DistributedDataParallel)
        with contextlib.nullcontext() if sync else net.no_sync():  # type: ignore[operator]
            with autocast:
                out = net(batch)
            (out["loss"] / accum).backward()
        sums += torch.tensor([_scalar(out[k]) for k in LOSS_KEYS], dtype=torch.float64)
    return sums / accum


def _scalar(value: Any) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def _mean_over_ranks(values: torch.Tensor, ctx: WorkerContext) -> torch.Tensor:
    if ctx.world_size == 1:
        return values
    on_device = values.to(ctx.device)
    dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
    return on_device.cpu() / ctx.world_size


@contextlib.contextmanager
def local_rank_zero_first(ctx: WorkerContext) -> Iterator[None]:
    """Run the block on each node's local rank 0 first, then on the others (one barrier each):
    the first build of a model writes the node's weight cache, which the others then read."""
    if ctx.world_size > 1 and ctx.local_rank != 0:
        dist.barrier()
    yield
    if ctx.world_size > 1 and ctx.local_rank == 0:
        dist.barrier()


def _gather(obj: Any, ctx: WorkerContext) -> list[Any]:
    if ctx.world_size == 1:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


class Trainer:
    """One rank's model, optimizer, data stream and (rank 0) log; :meth:`steps` runs them.

    Items come from the committed ``output``; checkpoints and the log go to ``workdir``/glamm/
    (default: the output itself; the benchmark points it elsewhere).
    """

    def __init__(self, cfg: TrainConfig, output: str, ctx: WorkerContext, workdir: str | None = None) -> None:
        from grand_pipeline.training.model.builder import build_model

        self.cfg, self.ctx = cfg, ctx
        self.workdir = workdir or output
        torch.set_num_threads(cfg.launch.threads())
        uri = ckpt_io.latest(self.workdir)
        self.resumed = ckpt_io.load(uri, map_location=ctx.device) if uri else None
        if self.resumed is not None:
            ckpt_io.check_config(self.resumed.uri, self.resumed.config_hash, cfg.content_hash())
        seed_everything(cfg.seed)  # the same model on every rank and every rerun
        with local_rank_zero_first(ctx):
            self.model, tokenizer = build_model(cfg.model, device=str(ctx.device), dtype=torch.float32)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = make_optimizer(self.params, cfg.optim)
        self.start = 0
        cursor = ckpt_io.Cursor()
        if self.resumed is not None:
            self.model.load_trainable_state_dict(self.resumed.trainable)
            self.optimizer.load_state_dict(self.resumed.optimizer)
            self.scheduler.load_state_dict(self.resumed.scheduler)
            self.start, cursor = self.resumed.step, self.resumed.cursors[ctx.rank]
        self.net: torch.nn.Module = self.model
        if ctx.world_size > 1:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            # Mixed-task batches leave the region encoder or the mask decoder unused now and then.
            self.net = DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=True)
        dataset = GrandGlammDataset(
            output, tokenizer, cfg.data_config(), rank=ctx.rank, world_size=ctx.world_size
        )
        self.stream = BatchStream(
            dataset, Collator.for_tokenizer(tokenizer), cfg.optim.batch_size,
            loader_workers=cfg.data.loader_workers, seed=cfg.data.seed, cursor=cursor,
            prefetch=cfg.launch.prefetch_items,
        )
        self.log = TrainLog(self.workdir, self.start) if ctx.is_main else None
        self.metrics = TrainMetrics.create() if ctx.is_main else TrainMetrics({})
        self.samples_per_step = ctx.world_size * cfg.optim.grad_accum * cfg.optim.batch_size

    def step(self, step: int, next_batch: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
        """One optimiser step (number ``step``, 1-based); returns its log record (all ranks)."""
        started = time.perf_counter()
        lr = float(self.optimizer.param_groups[0]["lr"])
        means = accumulate(
            self.net, next_batch or self.stream.next_batch, self.cfg.optim.grad_accum, self.ctx.device
        )
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        means = _mean_over_ranks(means, self.ctx)
        record: dict[str, Any] = {"step": step, **{k: float(v) for k, v in zip(LOSS_KEYS, means, strict=True)}}
        record["lr"] = lr
        record["samples_per_s"] = self.samples_per_step / max(time.perf_counter() - started, 1e-9)
        return record

    def save(self, step: int) -> str | None:
        """Checkpoint ``step`` (every rank takes part: cursors and RNG states are per rank)."""
        rngs = _gather(ckpt_io.rng_state(), self.ctx)
        cursors = _gather(self.stream.cursor, self.ctx)
        uri = None
        if self.ctx.is_main:
            uri = ckpt_io.save(
                self.workdir, step, config_yaml=self.cfg.to_yaml(), config_hash=self.cfg.content_hash(),
                trainable=self.model.trainable_state_dict(), optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(), rng=rngs, cursors=cursors,
            )
        if self.ctx.world_size > 1:
            dist.barrier()
        return uri

    def steps(self) -> Iterator[dict[str, Any]]:
        """Run to ``total_steps``, yielding each step's record; checkpoints on the way."""
        if self.resumed is not None:
            ckpt_io.set_rng_state(self.resumed.rng[self.ctx.rank])
        else:
            seed_everything(self.cfg.seed + 1 + self.ctx.rank)  # dropout differs between ranks
        total, every = self.cfg.optim.total_steps, self.cfg.checkpoint_every
        for step in range(self.start + 1, total + 1):
            record = self.step(step)
            if self.log is not None:
                self.log.append(record)
                self.metrics.record(record)
            if step % every == 0 or step == total:
                record = {**record, "checkpoint": self.save(step)}
            yield record


def train(
    cfg: TrainConfig,
    output: str,
    ctx: WorkerContext | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train (or resume) to ``cfg.optim.total_steps``; ``on_step`` gets rank 0's records."""
    trainer = Trainer(cfg, output, ctx or WorkerContext())
    last, saved = None, ckpt_io.latest(output) if trainer.ctx.is_main else None
    try:
        for record in trainer.steps():
            saved = record.pop("checkpoint", None) or saved
            last = record
            if trainer.ctx.is_main and on_step is not None:
                on_step(record)
    finally:
        trainer.stream.close()  # stops the prefetch thread before the process winds down
    return TrainResult(trainer.start, cfg.optim.total_steps, last, saved)
