"""``grand glamm train``'s typed config: a YAML profile + dotted ``--set`` overrides, validated early.

A profile (``training/profiles/{tiny,full}.yaml``) is a tree over :class:`TrainConfig`; its
``model:`` section belongs to :class:`~grand_pipeline.training.model.config.ModelConfig`, the rest
to the sections below. The pipeline's machinery does the work (``build`` rejects unknown keys and
wrong types naming the dotted key, ``parse_override``, ``deep_merge``); this module only adds the
sections, their range checks (again naming the dotted key) and the content hash. Everything is
checked before a model is built, so a typo costs a second, not a model load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from grand_pipeline.config import ConfigError, build, deep_merge, parse_override
from grand_pipeline.training.data.convert import ConvertOptions
from grand_pipeline.training.data.dataset import DEFAULT_TASK_WEIGHTS, DataConfig
from grand_pipeline.training.model.config import ModelConfig


@dataclass(frozen=True)
class ConvertSection:
    """The converters' filters (``ConvertOptions``; lists here because YAML has no tuples)."""

    methods: list[str] = field(default_factory=lambda: list(ConvertOptions().methods))
    only_verified: bool = ConvertOptions.only_verified
    floating: bool = ConvertOptions.floating
    short_gcg: bool = ConvertOptions.short_gcg
    max_regions: int = ConvertOptions.max_regions

    def options(self) -> ConvertOptions:
        return ConvertOptions(**{**dataclasses.asdict(self), "methods": tuple(self.methods)})


@dataclass(frozen=True)
class DataSection:
    """The ``DataConfig`` fields the model does not decide (sizes and image tokens it does)."""

    max_length: int = DataConfig.max_length
    """Tokens the LLM sees, image patches included."""
    task_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TASK_WEIGHTS))
    max_refseg: int = DataConfig.max_refseg
    seed: int = DataConfig.seed
    """Shard order and task draws (the model's init and dropout use the top-level ``seed``)."""
    loader_workers: int = 0
    """DataLoader worker processes per rank; they split the rank's shards, so the item order
    (and the results) depend on it."""
    convert: ConvertSection = field(default_factory=ConvertSection)

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.loader_workers < 0:
            yield "loader_workers", "must be >= 0"


@dataclass(frozen=True)
class OptimSection:
    """AdamW with linear warm-up then linear decay to 0 at ``total_steps`` (the reference's)."""

    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    warmup_steps: int = 100
    total_steps: int = 5000
    """Optimiser steps of the whole run (``--steps``); the schedule ends here."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 turns clipping off."""
    grad_accum: int = 10
    batch_size: int = 2
    """Items per micro-batch and worker; the global batch is workers x batch_size x grad_accum."""

    def problems(self) -> Iterator[tuple[str, str]]:
        if not self.lr > 0:
            yield "lr", "must be > 0"
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            yield "betas", f"need two numbers in [0, 1), got {self.betas}"
        for name in ("weight_decay", "warmup_steps", "grad_clip"):
            if getattr(self, name) < 0:
                yield name, "must be >= 0"
        for name in ("total_steps", "grad_accum", "batch_size"):
            if getattr(self, name) < 1:
                yield name, "must be >= 1"


@dataclass(frozen=True)
class LaunchSection:
    """Where the loop runs. Only ``workers`` and ``use_gpu`` change results (see ``content_hash``)."""

    executor: Literal["local", "ray"] = "local"
    workers: int = 1
    """Ranks (Ray Train workers). The local executor runs one, in-process."""
    use_gpu: bool = False
    """One GPU per worker, bf16 autocast; CPU workers train in fp32."""
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    strategy: Literal["ddp"] = "ddp"
    ray_address: str | None = None
    """None starts a local Ray; ``auto`` joins the cluster of ``ray job submit``."""
    torch_threads: int = 0
    """torch threads per worker; 0 means the worker's CPUs. Bit-identical losses need the same."""
    max_failures: int = 0
    """Ray Train restarts of a failed worker group; each restart resumes from the last checkpoint."""
    prefetch_items: int = 8
    """Items a background thread prepares ahead of the loop (0: load in the loop). The order and
    the resume cursor are unchanged; only the waiting goes (``make bench``)."""

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.workers < 1:
            yield "workers", "must be >= 1"
        if self.executor == "local" and self.workers != 1:
            yield "workers", f"the local executor runs one process, got {self.workers}; use --executor ray"
        for name in ("torch_threads", "max_failures", "prefetch_items"):
            if getattr(self, name) < 0:
                yield name, "must be >= 0"
        for name, amount in self.resources_per_worker.items():
            if amount < 0:
                yield f"resources_per_worker.{name}", "must be >= 0"
            if name == "GPU":
                yield f"resources_per_worker.{name}", "use launch.use_gpu (one GPU per worker)"

    def cpus(self) -> float:
        return float(self.resources_per_worker.get("CPU", 1.0))

    def threads(self) -> int:
        return self.torch_threads or max(1, int(self.cpus()))


@dataclass(frozen=True)
class TrainConfig:
    profile: str
    model: ModelConfig
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    launch: LaunchSection = field(default_factory=LaunchSection)
    checkpoint_every: int = 100
    """Optimiser steps between checkpoints (the last step always writes one)."""
    seed: int = 0
    """Model init (every rank builds the same model) and, offset by rank, dropout."""

    def data_config(self) -> DataConfig:
        """The Dataset's config: sizes from the model, the rest from ``data``."""
        d = self.data
        return self.model.data_config(
            max_length=d.max_length, task_weights=dict(d.task_weights), max_refseg=d.max_refseg,
            seed=d.seed, convert=d.convert.options(),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def content_hash(self) -> str:
        """Hash of what changes the loss sequence: all but the profile name, ``checkpoint_every``
        and the launch fields that only change speed or placement (workers and GPU/bf16 stay)."""
        data = self.to_dict()
        for key in ("profile", "checkpoint_every", "launch"):
            data.pop(key)
        data["world"] = {"workers": self.launch.workers, "use_gpu": self.launch.use_gpu}
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _profiles_dir() -> Path:
    return Path(str(resources.files("grand_pipeline.training") / "profiles"))


def train_profiles() -> list[str]:
    return sorted(p.stem for p in _profiles_dir().glob("*.yaml"))


def validate(cfg: TrainConfig) -> TrainConfig:
    """Range checks of every section, and the Dataset config they make; errors name the key."""
    for prefix in ("data", "optim", "launch"):
        for name, why in getattr(cfg, prefix).problems():
            raise ConfigError(f"{prefix}.{name}: {why}")
    if cfg.checkpoint_every < 1:
        raise ConfigError("checkpoint_every: must be >= 1")
    try:
        cfg.data_config()
    except ConfigError as exc:  # DataConfig / ConvertOptions name their own field
        where = "data.convert" if "Convert" in type(exc).__name__ else "data"
        raise ConfigError(f"{where}.{exc}") from None
    return cfg


def from_dict(data: dict[str, Any]) -> TrainConfig:
    """A validated config from a resolved tree (a profile after overrides, or a checkpoint's)."""
    return validate(build(TrainConfig, data))


def load_train_config(
    profile: str = "tiny",
    overrides: list[str] | None = None,
    *,
    steps: int | None = None,
    executor: str | None = None,
    workers: int | None = None,
) -> TrainConfig:
    """Profile, then each ``--set``, then the CLI flags (as the overrides they stand for)."""
    if profile not in train_profiles():
        raise ConfigError(f"--config: unknown training profile {profile!r}; known: {', '.join(train_profiles())}")
    data = yaml.safe_load((_profiles_dir() / f"{profile}.yaml").read_text()) or {}
    flags = {"optim.total_steps": steps, "launch.executor": executor, "launch.workers": workers}
    items = list(overrides or []) + [f"{k}={v}" for k, v in flags.items() if v is not None]
    for item in items:
        data = deep_merge(data, parse_override(item))
    data["profile"] = profile
    return from_dict(data)
