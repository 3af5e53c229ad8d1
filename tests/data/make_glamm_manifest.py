"""Write ``glamm_full_manifest.json``: the state-dict keys and shapes of the released merged GLaMM
checkpoints (``MBZUAI/GLaMM-GranD-Pretrained``, ``GLaMM-GCG``, ...), written from the reference's
structure, not from this project's model code (which ``tests/test_glamm_model.py`` checks against it).

Facts (glamm_reference.md §1 and groundingLMM ``e74865f``):
* Llama-7B (Vicuna v1.5): hidden 4096, 32 layers, 32 heads, MLP 11008, 32000 + 7 GLaMM tokens;
  ``model.embed_tokens``, ``model.layers.*``, ``model.norm``, ``lm_head``; no rotary ``inv_freq``
  (a non-persistent buffer in the transformers the checkpoints were saved with).
* ``model.mm_projector``: Linear(1024, 4096) - GELU - Linear(4096, 4096).
* ``model.region_encoder`` (``model/layers.py``, embed 1024, out 4096, 4 levels, 5 fuse rounds,
  RoIAlign 14, GroupNorm 64): ``mlvl_fuse.input_conv.{l}`` 1x1 1026->1024, ``mlvl_fuse.fuse_convs.{r}``
  (mmcv ConvModule: ``conv`` 3x3 without bias, ``gn``), ``roi_align.pconvs.{l}`` 3x3 with bias,
  ``roi_align.pos_embedd`` Linear(4,256) ReLU LN(256) Linear(256,1024) ReLU LN(1024),
  ``roi_align.updims`` Linear(1024, 4096), ``roi_align.flatten_linear`` Linear(1024*14*14, 1024).
* ``model.grounding_encoder``: upstream SAM ViT-H (GLaMM's copy has no extra parameters); the
  ``pixel_mean``/``pixel_std`` buffers are non-persistent.
* ``model.text_hidden_fcs.0``: Linear(4096, 4096) - ReLU - Linear(4096, 256) - Dropout.
* No ``vision_tower`` keys (the authors' merge script drops them) and no LoRA keys (merged).

Run: ``.venv/bin/python tests/data/make_glamm_manifest.py`` (meta device: no weights, no download).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB, HIDDEN, CLIP, LP, ROI, LEVELS, ROUNDS = 32000 + 7, 4096, 1024, 256, 14, 4, 5


def llama() -> dict[str, list[int]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def sam() -> dict[str, list[int]]:
    from segment_anything import build_sam_vit_h

    with torch.device("meta"):
        model = build_sam_vit_h(checkpoint=None)
    return {f"model.grounding_encoder.{k}": list(v.shape) for k, v in model.state_dict().items()}


def linear(prefix: str, n_in: int, n_out: int, bias: bool = True) -> dict[str, list[int]]:
    out = {f"{prefix}.weight": [n_out, n_in]}
    if bias:
        out[f"{prefix}.bias"] = [n_out]
    return out


def region() -> dict[str, list[int]]:
    p = "model.region_encoder"
    out: dict[str, list[int]] = {}
    for lvl in range(LEVELS):
        out |= {
            f"{p}.mlvl_fuse.input_conv.{lvl}.weight": [CLIP, CLIP + 2, 1, 1],
            f"{p}.mlvl_fuse.input_conv.{lvl}.bias": [CLIP],
        }
    for r in range(ROUNDS):
        out[f"{p}.mlvl_fuse.fuse_convs.{r}.conv.weight"] = [CLIP, CLIP, 3, 3]
        out |= {
            f"{p}.mlvl_fuse.fuse_convs.{r}.gn.weight": [CLIP],
            f"{p}.mlvl_fuse.fuse_convs.{r}.gn.bias": [CLIP],
        }
    for lvl in range(LEVELS):
        out |= {
            f"{p}.roi_align.pconvs.{lvl}.weight": [CLIP, CLIP, 3, 3],
            f"{p}.roi_align.pconvs.{lvl}.bias": [CLIP],
        }
    out |= linear(f"{p}.roi_align.pos_embedd.0", 4, 256)
    out |= {f"{p}.roi_align.pos_embedd.2.weight": [256], f"{p}.roi_align.pos_embedd.2.bias": [256]}
    out |= linear(f"{p}.roi_align.pos_embedd.3", 256, CLIP)
    out |= {f"{p}.roi_align.pos_embedd.5.weight": [CLIP], f"{p}.roi_align.pos_embedd.5.bias": [CLIP]}
    out |= linear(f"{p}.roi_align.updims", CLIP, HIDDEN)
    out |= linear(f"{p}.roi_align.flatten_linear", CLIP * ROI * ROI, CLIP)
    return out


def manifest() -> dict[str, list[int]]:
    keys = llama() | sam() | region()
    keys |= linear("model.mm_projector.0", CLIP, HIDDEN) | linear("model.mm_projector.2", HIDDEN, HIDDEN)
    keys |= linear("model.text_hidden_fcs.0.0", HIDDEN, HIDDEN) | linear(
        "model.text_hidden_fcs.0.2", HIDDEN, LP
    )
    return dict(sorted(keys.items()))


if __name__ == "__main__":
    target = Path(__file__).with_name("glamm_full_manifest.json")
    keys = manifest()
    lines = [f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in keys.items()]
    source = json.dumps("MBZUAI/GLaMM-GranD-Pretrained (merged layout); written by make_glamm_manifest.py")
    target.write_text('{\n  "source": ' + source + ',\n  "keys": {\n' + ",\n".join(lines) + "\n  }\n}\n")
    print(
        f"{len(keys)} keys, {sum(int(torch.tensor(s).prod()) for s in keys.values())} parameters -> {target}"
    )
