"""``build_model(cfg)``: a GLaMM and its tokenizer from the weight sources of a ``ModelConfig``.

Sources resolve through ``grand_pipeline.models.weights.resolve`` (``hf:org/name@rev``, a local
path, ``s3://...``). ``tiny:<seed>`` writes seeded random weights of the configured tiny sizes
into the cache once, in the real formats (a CLIP vision folder, a Llama folder with the project's
offline word-level tokenizer, a SAM ``.pth`` state dict), and they then load through the very code
that loads real weights. SAM files are read with ``torch.load(weights_only=True)``.

Order: CLIP, the Llama and its tokenizer (GLaMM's 7 tokens added; new rows initialised to the
mean of the old ones, as LLaVA does), SAM; LoRA is injected into the bare Llama (so only its
``q_proj``/``v_proj`` can match); GLaMM's own modules are attached; then, when the LLM source is a
GLaMM checkpoint, its ``mm_projector``/``region_encoder``/``text_hidden_fcs``/``grounding_encoder``
weights replace the fresh ones. Modules no source provides (the region encoder and L-P when
starting from Vicuna or tiny weights) draw from torch's global RNG: seed it first
(``TrainConfig.seed``), as the training loop does.

``meta=True`` builds the same module tree on the meta device from the config's sizes alone: no
file is read, nothing is downloaded, and no tokenizer is returned (the state-dict manifest test).
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from grand_pipeline.config import ConfigError
from grand_pipeline.models import weights
from grand_pipeline.models.backends.sam import build_sam
from grand_pipeline.models.hf_common import quiet, save_pretrained, seeded, tiny_tokenizer
from grand_pipeline.training.data.tokens import SPECIAL_TOKENS, add_special_tokens
from grand_pipeline.training.model.config import ClipSection, LlmSection, LoraSection, ModelConfig, SamSection
from grand_pipeline.training.model.glamm import GLaMM, TokenIds

logger = logging.getLogger(__name__)

SAM_FILE = "sam.pth"
#: GLaMM checkpoint keys that belong to modules outside the Llama.
EXTRA_PREFIXES = (
    "model.mm_projector.",
    "model.region_encoder.",
    "model.text_hidden_fcs.",
    "model.grounding_encoder.",
)


def _name(kind: str, section: Any) -> str:
    """Weights name for messages; a tiny source's cache folder is also keyed by the sizes."""
    if not str(section.source).startswith("tiny:"):
        return f"glamm-{kind}"
    sizes = {k: v for k, v in asdict(section).items() if k != "source"}
    return f"glamm-{kind}-" + hashlib.sha256(json.dumps(sizes, sort_keys=True).encode()).hexdigest()[:12]


def _check_dims(key: str, loaded: Any, section: ClipSection | LlmSection) -> None:
    """Refuse a checkpoint whose sizes differ from the config's."""
    for name, attr in section.HF_FIELDS.items():
        got, want = getattr(loaded, attr, None), getattr(section, name)
        if got != want:
            raise ConfigError(f"model.{key}.{name}: the checkpoint has {got}, the config says {want}")


# ----------------------------------------------------------------------------- tiny weight writers


def _tiny_clip(folder: Path, seed: int, section: ClipSection) -> None:
    from transformers import CLIPVisionModel

    model = seeded(seed, lambda: CLIPVisionModel(section.hf_config()))
    with quiet():
        model.save_pretrained(folder)


def _tiny_llm(folder: Path, seed: int, section: LlmSection) -> None:
    from transformers import LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    if section.vocab_size is not None and section.vocab_size != len(tokenizer):
        raise ConfigError(
            f"model.llm.vocab_size: the tiny tokenizer has {len(tokenizer)} words, not {section.vocab_size}"
        )
    model = seeded(seed, lambda: LlamaForCausalLM(section.hf_config(len(tokenizer))))
    save_pretrained(folder, model, tokenizer)


def _tiny_sam(folder: Path, seed: int, section: SamSection) -> None:
    sam = seeded(seed, lambda: build_sam(section.variant, img_size=section.img_size))
    torch.save(sam.state_dict(), folder / SAM_FILE)


# ----------------------------------------------------------------------------- loaders


def load_clip(section: ClipSection, dtype: torch.dtype) -> nn.Module:
    from transformers import CLIPVisionModel

    name = _name("clip", section)
    resolved = weights.resolve(section.source, name=name, tiny_builder=partial(_tiny_clip, section=section))
    with quiet():
        clip = CLIPVisionModel.from_pretrained(resolved.path, local_files_only=True, dtype=dtype)
    _check_dims("clip", clip.config, section)
    return clip


def load_llm(section: LlmSection, dtype: torch.dtype) -> tuple[Any, Any, Path]:
    """(LlamaForCausalLM with GLaMM's tokens, its tokenizer, the weights folder)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    name = _name("llm", section)
    resolved = weights.resolve(section.source, name=name, tiny_builder=partial(_tiny_llm, section=section))
    folder = resolved.path
    with quiet():
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, padding_side="right")
        llm: Any = LlamaForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token  # the reference pads with unk
    _check_dims("llm", llm.config, section)
    c = section
    rows = int(llm.get_input_embeddings().num_embeddings)
    if c.vocab_size is not None and rows not in (c.vocab_size, c.vocab_size + len(SPECIAL_TOKENS)):
        raise ConfigError(
            f"model.llm.vocab_size: the checkpoint has {rows} embedding rows, the config says {c.vocab_size}"
        )
    add_special_tokens(tokenizer)
    if len(tokenizer) != rows:
        _resize(llm, len(tokenizer))
    return llm, tokenizer, Path(folder)


@torch.no_grad()
def _resize(llm: Any, size: int) -> None:
    """Resize embeddings and head to ``size`` rows; new rows start at the mean of the old ones."""
    old = int(llm.get_input_embeddings().num_embeddings)
    llm.resize_token_embeddings(size, mean_resizing=False)
    for weight in (llm.get_input_embeddings().weight, llm.get_output_embeddings().weight):
        weight[old:] = weight[:old].mean(0, keepdim=True)


def load_sam(section: SamSection) -> nn.Module:
    """SAM of ``section.variant`` at ``img_size``, with its ``.pth`` loaded (fresh when no source)."""
    sam = build_sam(section.variant, img_size=section.img_size)
    if not section.source:
        return sam
    resolved = weights.resolve(
        section.source, name=_name("sam", section), tiny_builder=partial(_tiny_sam, section=section)
    )
    path = resolved.path
    if path.is_dir():
        found = sorted(path.rglob("*.pth"))
        if len(found) != 1:
            raise weights.ModelSourceError(
                f"glamm sam: expected one .pth in {path}, found {[f.name for f in found]}"
            )
        path = found[0]
    sam.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return sam


def checkpoint_extras(folder: Path) -> dict[str, Tensor]:
    """The GLaMM-module tensors (``EXTRA_PREFIXES``) of the LLM checkpoint in ``folder``, if any."""
    files: list[Path] = []
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({folder / f for k, f in weight_map.items() if k.startswith(EXTRA_PREFIXES)})
            break
    else:
        files = [p for p in (folder / "model.safetensors", folder / "pytorch_model.bin") if p.is_file()]
    out: dict[str, Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:
                out.update({k: handle.get_tensor(k) for k in handle.keys() if k.startswith(EXTRA_PREFIXES)})
        else:
            shard = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            out.update({k: v for k, v in shard.items() if k.startswith(EXTRA_PREFIXES)})
    return out


def load_extras(model: GLaMM, extras: dict[str, Tensor]) -> list[str]:
    """Load each GLaMM module the checkpoint has (strictly); returns the prefixes loaded."""
    loaded = []
    for prefix in EXTRA_PREFIXES:
        part = {k[len(prefix) :]: v for k, v in extras.items() if k.startswith(prefix)}
        if part:
            model.get_submodule(prefix.rstrip(".")).load_state_dict(part, strict=True)
            loaded.append(prefix)
    return loaded


def apply_lora(llm: nn.Module, lora: LoraSection) -> None:
    """Inject LoRA adapters into ``llm`` in place (peft); only the Llama exists at this point."""
    if lora.r == 0:
        return
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.targets),
        bias="none",
    )
    with warnings.catch_warnings():  # peft reads a transformers property deprecated in v5
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        get_peft_model(llm, config)  # modifies llm's layers; the wrapper itself is not kept


# ----------------------------------------------------------------------------- entry point


def build_model(
    cfg: ModelConfig,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    meta: bool = False,
) -> tuple[GLaMM, Any]:
    """The GLaMM of ``cfg`` on ``device`` in ``dtype`` and its tokenizer (module docstring)."""
    if meta:
        return _build_meta(cfg), None
    clip = load_clip(cfg.clip, dtype)
    llm, tokenizer, folder = load_llm(cfg.llm, dtype)
    sam = load_sam(cfg.sam)
    apply_lora(llm, cfg.lora)
    model = GLaMM(cfg, clip, llm, sam, TokenIds.of(tokenizer), tokenizer)
    loaded = load_extras(model, checkpoint_extras(folder))
    if not cfg.sam.source and "model.grounding_encoder." not in loaded:
        raise ConfigError("model.sam.source: empty, and the LLM checkpoint has no grounding_encoder weights")
    if loaded:
        logger.info(
            "glamm: %s loaded from the LLM checkpoint %s", ", ".join(p.rstrip(".") for p in loaded), folder
        )
    return model.to(device=device, dtype=dtype), tokenizer


def _build_meta(cfg: ModelConfig) -> GLaMM:
    from transformers import CLIPVisionModel, LlamaForCausalLM

    if cfg.llm.vocab_size is None:
        raise ConfigError("model.llm.vocab_size: needed to build on the meta device (no tokenizer is read)")
    vocab = cfg.llm.vocab_size
    with torch.device("meta"):
        clip = CLIPVisionModel(cfg.clip.hf_config())
        llm = LlamaForCausalLM(cfg.llm.hf_config(vocab + len(SPECIAL_TOKENS)))
        sam = build_sam(cfg.sam.variant, img_size=cfg.sam.img_size)
        apply_lora(llm, cfg.lora)
        return GLaMM(cfg, clip, llm, sam, TokenIds.appended(vocab))
