"""``grand glamm export-weights``: a checkpoint -> merged weights a plain GLaMM loads.

The checkpoint holds the trainable state only; the model is rebuilt from the checkpoint's own
``config.yaml`` (same seed, so the same frozen weights), the trainable state is loaded, and
``merged_state_dict()`` (LoRA folded into the base weights) is written as safetensors. The folder
is written like a checkpoint (staging, publish, marker last)::

    TO/model.safetensors     the merged state dict
    TO/config.yaml           the resolved TrainConfig (its ``model:`` section builds the model)
    TO/export.json           the marker: source checkpoint, step, config hash, file digests
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import yaml
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from grand_pipeline.training.config import TrainConfig, from_dict

from . import checkpoint as ckpt_io
from .loop import seed_everything
from .storage import Location

if TYPE_CHECKING:
    from grand_pipeline.training.model.glamm import GLaMM

logger = logging.getLogger(__name__)

WEIGHTS, CONFIG, MARKER = "model.safetensors", "config.yaml", "export.json"


@dataclass(frozen=True)
class Exported:
    uri: str
    checkpoint: str
    step: int
    tensors: int


def restore(checkpoint: ckpt_io.Checkpoint) -> tuple[GLaMM, TrainConfig]:
    """The model a checkpoint was trained as, with its trainable state loaded (CPU, fp32)."""
    from grand_pipeline.training.model.builder import build_model

    cfg = from_dict(yaml.safe_load(checkpoint.config_yaml))
    seed_everything(cfg.seed)  # the frozen weights of the run (Trainer seeds the same way)
    model, _ = build_model(cfg.model, device="cpu", dtype=torch.float32)
    model.load_trainable_state_dict(checkpoint.trainable)
    return model.eval(), cfg


def export_weights(output: str, to: str, checkpoint: str | None = None) -> Exported:
    """Merge ``checkpoint`` (default: the newest under ``output``) into ``to``."""
    uri = checkpoint or ckpt_io.latest(output)
    if uri is None:
        raise ckpt_io.CheckpointError(f"no complete checkpoint under {output}/glamm/checkpoints")
    loaded = ckpt_io.load(uri)
    model, cfg = restore(loaded)
    with torch.no_grad():
        merged = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.merged_state_dict().items()}
    files = {WEIGHTS: save_safetensors(merged), CONFIG: cfg.to_yaml().encode()}
    target = Location.of(to)
    parent = Location(target.fs, posixpath.dirname(target.root), posixpath.dirname(target.uri))
    record = {"checkpoint": uri, "step": loaded.step, "config_hash": loaded.config_hash}
    parent.write_folder(posixpath.basename(target.root), files, MARKER, record)
    logger.info("exported %d tensors of %s to %s", len(merged), uri, target.uri)
    return Exported(target.uri, uri, loaded.step, len(merged))


def load_exported(to: str) -> tuple[dict[str, torch.Tensor], TrainConfig]:
    """An export's merged state dict and config, verified against its marker."""
    folder = Location.of(to)
    record = folder.read_marker(MARKER)
    if record is None:
        raise ckpt_io.CheckpointError(f"{to} is not a complete export (no valid {MARKER})")
    cfg = from_dict(yaml.safe_load(folder.read_verified(CONFIG, record)))
    return load_safetensors(folder.read_verified(WEIGHTS, record)), cfg
