"""GLaMM's state dicts: the trainable part (checkpoints) and the merged one (releases, manifest).

* **Trainable** (``trainable_state_dict``): every parameter with ``requires_grad``, under its
  ``state_dict`` name: the LoRA adapter (``...q_proj.lora_A.default.weight``), the region encoder,
  the L-P projection, the mask decoder, the V-L projection when trained, and the embedding and
  LM-head matrices. With ``embeddings: new_rows`` only GLaMM's token rows of those two can change,
  so only they are saved, as ``model.embed_tokens.weight.new_rows`` / ``lm_head.weight.new_rows``
  ([n_new, D], rows in ``TokenIds.new_rows`` order). The frozen rest is rebuilt from the sources.
* **Merged** (``merged_state_dict``): the layout of the released ``MBZUAI/GLaMM-*`` checkpoints:
  LoRA folded into the base weights (``W + scale * B @ A`` under the plain ``...q_proj.weight``
  name, no ``lora_``/``base_layer`` keys) and the CLIP tower left out (the authors' merge script
  drops ``vision_tower`` keys; CLIP loads from its own source). ``load_merged_state_dict`` is its
  inverse: base weights set, adapters zeroed (``B = 0``), so a released checkpoint loads strictly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

VISION_PREFIX = "model.vision_tower."
ROWS_SUFFIX = ".new_rows"
ROW_PARAMS = ("model.embed_tokens.weight", "lm_head.weight")


def lora_layers(module: nn.Module) -> dict[str, Any]:
    """name -> peft LoRA layer (modules with a ``base_layer`` and LoRA adapters)."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


def _merged_name(key: str) -> str | None:
    """The merged-layout name of a ``state_dict`` key, or None when the merged layout drops it."""
    if key.startswith(VISION_PREFIX) or ".lora_" in key:
        return None
    return key.replace(".base_layer.", ".")


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The released checkpoints' layout of ``model`` (module docstring); tensors are new for merged
    LoRA weights and the live parameters otherwise (detach/clone before mutating)."""
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        name = _merged_name(key)
        if name is not None:
            out[name] = value
    for name, layer in lora_layers(model).items():
        if layer.merged:
            continue
        weight = out[f"{name}.weight"]
        for adapter in layer.active_adapters:
            weight = weight + layer.get_delta_weight(adapter).to(weight.dtype)
        out[f"{name}.weight"] = weight
    return out


def _check_keys(expected: set[str], given: set[str], what: str) -> None:
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise KeyError(
            f"{what}: {len(missing)} missing key(s) {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}"
        )


def _copy(target: Tensor, value: Tensor, key: str) -> None:
    if tuple(target.shape) != tuple(value.shape):
        raise ValueError(f"{key}: shape {tuple(value.shape)} does not fit the model's {tuple(target.shape)}")
    target.copy_(value.to(target.device, target.dtype))


@torch.no_grad()
def load_merged_state_dict(model: nn.Module, state: Mapping[str, Tensor], strict: bool = True) -> None:
    """Load a merged-layout state dict (a release or ``merged_state_dict``) into ``model``."""
    live = model.state_dict(keep_vars=True)
    targets = {name: key for key in live if (name := _merged_name(key)) is not None}
    if strict:
        _check_keys(set(targets), set(state), "merged state dict")
    for name, value in state.items():
        if name in targets:
            _copy(live[targets[name]], value, name)
    for layer in lora_layers(model).values():
        for adapter in layer.lora_B:
            layer.lora_B[adapter].weight.zero_()  # the loaded weight already holds the adapter


def trainable_state_dict(model: nn.Module, rows: Tensor | None) -> dict[str, Tensor]:
    """The trainable parameters (module docstring); ``rows``: GLaMM's token ids with
    ``embeddings: new_rows``, else None."""
    out: dict[str, Tensor] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if rows is not None and name in ROW_PARAMS:
            out[name + ROWS_SUFFIX] = param.detach()[rows.to(param.device)].clone()
        else:
            out[name] = param.detach()
    return out


@torch.no_grad()
def load_trainable_state_dict(
    model: nn.Module, state: Mapping[str, Tensor], rows: Tensor | None, strict: bool = True
) -> None:
    """Inverse of :func:`trainable_state_dict`; ``strict`` requires exactly its keys."""
    params = dict(model.named_parameters())
    expected = set(trainable_state_dict(model, rows)) if strict else set()
    if strict:
        _check_keys(expected, set(state), "trainable state dict")
    for key, value in state.items():
        if key.endswith(ROWS_SUFFIX) and key[: -len(ROWS_SUFFIX)] in ROW_PARAMS:
            if rows is None:
                raise KeyError(f"{key}: the model trains whole embedding matrices (embeddings: full)")
            target = params[key[: -len(ROWS_SUFFIX)]]
            index = rows.to(target.device)
            if tuple(value.shape) != (index.numel(), target.shape[1]):
                raise ValueError(f"{key}: shape {tuple(value.shape)} does not fit {index.numel()} rows")
            target[index] = value.to(target.device, target.dtype)
        elif key in params:
            _copy(params[key], value, key)
        elif strict:
            raise KeyError(f"{key}: not a parameter of the model")
