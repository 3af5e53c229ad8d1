"""Training checkpoints: ``OUT/glamm/checkpoints/step_<N>/``, exact resume, config fencing.

A checkpoint holds what resuming needs to continue as if never stopped::

    trainable.safetensors   the trainable state (LoRA adapter + trainable modules), not the frozen bulk
    optimizer.pt            AdamW's state
    state.pt                scheduler, per-rank RNG states, per-rank data cursors
    config.yaml             the resolved TrainConfig (export rebuilds the model from it)
    checkpoint.json         the marker, written last: step, config hash, world size, file digests

Written by rank 0 through :class:`~.storage.Location` (staging, publish, marker last), so a kill
leaves the previous checkpoint as :func:`latest`. ``.pt`` files are read with
``torch.load(weights_only=True)``: they hold tensors, numbers and strings only.
"""

from __future__ import annotations

import io
import logging
import random
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from grand_pipeline.config import ConfigError

from .storage import Location

logger = logging.getLogger(__name__)

CHECKPOINTS = ("glamm", "checkpoints")
MARKER = "checkpoint.json"
TRAINABLE, OPTIMIZER, STATE, CONFIG = "trainable.safetensors", "optimizer.pt", "state.pt", "config.yaml"
_STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used for this run (another config, none there): one line."""


@dataclass(frozen=True)
class Cursor:
    """Where a rank's data stream stands: its epoch and the items it took from that epoch."""

    epoch: int = 0
    items: int = 0


@dataclass
class Checkpoint:
    """A loaded checkpoint (tensors on CPU unless ``map_location`` said otherwise)."""

    uri: str
    step: int
    config_hash: str
    world_size: int
    config_yaml: str
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any] = field(repr=False)
    scheduler: dict[str, Any] = field(repr=False)
    rng: list[dict[str, Any]] = field(repr=False)
    cursors: list[Cursor] = field(default_factory=list)


def checkpoints(output: str) -> Location:
    return Location.of(output).child(*CHECKPOINTS)


def step_name(step: int) -> str:
    return f"step_{step}"


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch, CUDA, Python, NumPy) as plain tensors and numbers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save(
    output: str,
    step: int,
    *,
    config_yaml: str,
    config_hash: str,
    trainable: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    scheduler: dict[str, Any],
    rng: list[dict[str, Any]],
    cursors: list[Cursor],
) -> str:
    """Write ``step_<step>`` (``rng`` and ``cursors`` per rank); returns its URI."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in trainable.items()}
    files = {
        TRAINABLE: save_safetensors(tensors),
        OPTIMIZER: _torch_bytes(optimizer),
        STATE: _torch_bytes(
            {"scheduler": scheduler, "rng": rng, "cursors": [[c.epoch, c.items] for c in cursors]}
        ),
        CONFIG: config_yaml.encode(),
    }
    record = {"step": step, "config_hash": config_hash, "world_size": len(cursors)}
    root = checkpoints(output)
    root.write_folder(step_name(step), files, MARKER, record)
    logger.info("checkpoint step %d -> %s", step, root.child(step_name(step)).uri)
    return root.child(step_name(step)).uri


def completed(output: str) -> dict[int, dict[str, Any]]:
    """step -> marker of every complete checkpoint under ``output``."""
    root = checkpoints(output)
    out = {}
    for name in root.listdir():
        match = _STEP_RE.match(name)
        if match and (record := root.child(name).read_marker(MARKER)) is not None:
            out[int(match.group(1))] = record
    return out


def latest(output: str) -> str | None:
    """URI of the newest complete checkpoint under ``output``, or None."""
    done = completed(output)
    return checkpoints(output).child(step_name(max(done))).uri if done else None


def read_marker(uri: str) -> dict[str, Any]:
    record = Location.of(uri).read_marker(MARKER)
    if record is None:
        raise CheckpointError(f"{uri} is not a complete checkpoint (no valid {MARKER})")
    return record


def check_config(uri: str, written: str, config_hash: str) -> None:
    """Refuse a checkpoint of another config: resuming it would silently train something else."""
    if written != config_hash:
        raise CheckpointError(
            f"{uri} was written by config {written}, this run's is {config_hash}: "
            "rerun with the same --config/--set/--steps/--workers, or use another --output"
        )


def load(uri: str, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read and verify (sha256 against the marker) every file of the checkpoint at ``uri``."""
    record = read_marker(uri)
    folder = Location.of(uri)

    def torch_file(name: str, location: str | torch.device) -> Any:
        data = folder.read_verified(name, record)
        return torch.load(io.BytesIO(data), map_location=location, weights_only=True)

    state = torch_file(STATE, "cpu")  # RNG states must stay CPU tensors
    trainable = load_safetensors(folder.read_verified(TRAINABLE, record))
    return Checkpoint(
        uri=uri,
        step=int(record["step"]),
        config_hash=str(record["config_hash"]),
        world_size=int(record["world_size"]),
        config_yaml=folder.read_verified(CONFIG, record).decode(),
        trainable={k: v.to(map_location) for k, v in trainable.items()},
        optimizer=torch_file(OPTIMIZER, map_location),
        scheduler=state["scheduler"],
        rng=state["rng"],
        cursors=[Cursor(int(e), int(n)) for e, n in state["cursors"]],
    )
