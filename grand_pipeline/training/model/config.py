"""GLaMM's model configuration: typed, frozen sections, every size the model code uses.

``ModelConfig`` is the ``model:`` section of a training profile (``training/profiles/*.yaml``)
and is built with ``grand_pipeline.config.build(ModelConfig, tree, prefix="model")``, which
rejects unknown keys and wrong types; ``__post_init__`` adds the range and consistency checks,
raising ``ConfigError`` that names the dotted key (``model.clip.layers: ...``).

The defaults are the reference's full model (CLIP ViT-L/14-336, Vicuna-7B, SAM ViT-H, region
encoder 1024 -> 4096, L-P to 256) with this project's fixed behaviours: a trained V-L projection,
new-rows-only embedding training, ``clip`` RoI frame and ``pad`` CLIP preprocessing (released
checkpoints were trained with ``frozen``/``full``/``224``/``center_crop``: glamm_reference.md §6.7).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

from grand_pipeline.config import ConfigError
from grand_pipeline.models.backends.sam import PATCH as SAM_PATCH
from grand_pipeline.models.backends.sam import VARIANTS as SAM_VARIANTS
from grand_pipeline.training.data.dataset import DataConfig

PREFIX = "model"


def _bad(key: str, why: str) -> ConfigError:
    return ConfigError(f"{PREFIX}.{key}: {why}")


def _positive(section: str, obj: Any, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < 1:
            raise _bad(f"{section}.{name}", f"must be >= 1, got {getattr(obj, name)}")


@dataclass(frozen=True)
class ClipSection:
    """The global image encoder (``transformers.CLIPVisionModel``), frozen."""

    source: str = "hf:openai/clip-vit-large-patch14-336@main"
    """Weights: ``hf:org/name@rev``, a local folder, ``s3://...`` or ``tiny:<seed>``."""
    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    layers: int = 24
    heads: int = 16
    select_layer: int = -2
    """Hidden state whose patch tokens (CLS dropped) become the image tokens."""
    region_levels: list[int] | None = None
    """Hidden-state indices the region encoder reads (0 = embeddings); None derives them as the
    reference does: every third state back from ``select_layer``, the last ``region.levels``
    of them, shallowest first (14, 17, 20, 23 for 24 layers)."""

    #: field -> ``transformers.CLIPVisionConfig`` attribute (the sizes a checkpoint must match)
    HF_FIELDS: ClassVar[dict[str, str]] = {
        "hidden_size": "hidden_size",
        "intermediate_size": "intermediate_size",
        "layers": "num_hidden_layers",
        "heads": "num_attention_heads",
        "image_size": "image_size",
        "patch_size": "patch_size",
    }

    def __post_init__(self) -> None:
        _positive(
            "clip", self, "image_size", "patch_size", "hidden_size", "intermediate_size", "layers", "heads"
        )
        if self.image_size % self.patch_size:
            raise _bad(
                "clip.image_size", f"{self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.hidden_size % self.heads:
            raise _bad("clip.heads", f"hidden_size {self.hidden_size} is not divisible by {self.heads} heads")
        if not -(self.layers + 1) <= self.select_layer <= self.layers:
            raise _bad(
                "clip.select_layer", f"{self.select_layer} is not a hidden state of {self.layers} layers"
            )

    def hf_config(self) -> Any:
        """The ``CLIPVisionConfig`` of these sizes (tiny weights and meta builds)."""
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(**{hf: getattr(self, name) for name, hf in self.HF_FIELDS.items()})

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def level_indices(self, levels: int) -> list[int]:
        """Non-negative hidden-state indices of the ``levels`` region-encoder inputs."""
        states = self.layers + 1
        if self.region_levels is not None:
            chosen = list(self.region_levels)
            key = "clip.region_levels"
        else:
            last = self.select_layer % states
            chosen = [last - 3 * k for k in range(levels)][::-1]
            key = "clip.layers"
        if len(chosen) != levels or any(not 0 <= i < states for i in chosen):
            raise _bad(key, f"region levels {chosen} are not {levels} hidden states of 0..{states - 1}")
        return chosen


@dataclass(frozen=True)
class LlmSection:
    """The language model (``transformers.LlamaForCausalLM``)."""

    source: str = "hf:MBZUAI/GLaMM-GranD-Pretrained@f30420facbbd2311f66a358b40178343d9795c4d"
    """A Llama folder (Vicuna, or a GLaMM checkpoint whose extra modules are loaded too)."""
    vocab_size: int | None = 32000
    """Base vocabulary without GLaMM's 7 tokens; None takes it from the source (not with meta)."""
    hidden_size: int = 4096
    intermediate_size: int = 11008
    layers: int = 32
    heads: int = 32
    max_positions: int = 4096
    rms_norm_eps: float = 1e-5

    #: field -> ``transformers.LlamaConfig`` attribute (the sizes a checkpoint must match)
    HF_FIELDS: ClassVar[dict[str, str]] = {
        "hidden_size": "hidden_size",
        "intermediate_size": "intermediate_size",
        "layers": "num_hidden_layers",
        "heads": "num_attention_heads",
        "max_positions": "max_position_embeddings",
        "rms_norm_eps": "rms_norm_eps",
    }

    def __post_init__(self) -> None:
        _positive("llm", self, "hidden_size", "intermediate_size", "layers", "heads", "max_positions")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise _bad("llm.vocab_size", f"must be >= 1 or null, got {self.vocab_size}")
        if self.hidden_size % self.heads:
            raise _bad("llm.heads", f"hidden_size {self.hidden_size} is not divisible by {self.heads} heads")

    def hf_config(self, vocab: int) -> Any:
        """The ``LlamaConfig`` of these sizes with ``vocab`` embedding rows (multi-head attention)."""
        from transformers import LlamaConfig

        fields = {hf: getattr(self, name) for name, hf in self.HF_FIELDS.items()}
        return LlamaConfig(
            vocab_size=vocab, num_key_value_heads=self.heads, tie_word_embeddings=False, **fields
        )


@dataclass(frozen=True)
class LoraSection:
    """LoRA on the LLM's attention projections (peft); ``r: 0`` trains no adapter."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module-name suffixes inside the LLM's decoder layers (never SAM's or CLIP's)."""

    def __post_init__(self) -> None:
        if self.r < 0 or self.alpha < 1:
            raise _bad("lora.r", f"need r >= 0 and alpha >= 1, got r={self.r}, alpha={self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise _bad("lora.dropout", f"must be in [0, 1), got {self.dropout}")
        if self.r and not self.targets:
            raise _bad("lora.targets", "name at least one module, e.g. [q_proj, v_proj]")


@dataclass(frozen=True)
class SamSection:
    """The grounding encoder: SAM's image and prompt encoders (frozen) and mask decoder (trained)."""

    variant: Literal["vit_h", "vit_l", "vit_b", "tiny"] = "vit_h"
    img_size: int = 1024
    """Side of SAM's square input (``ResizeLongestSide`` target), a multiple of its 16-px patch."""
    source: str = "hf:ybelkada/segment-anything@7790786db131bcdc639f24a915d9f2c331d843ee/checkpoints/sam_vit_h_4b8939.pth"
    """A SAM ``.pth`` (or ``tiny:<seed>``); empty: only from a GLaMM LLM checkpoint."""

    def __post_init__(self) -> None:
        _positive("sam", self, "img_size")
        if self.img_size % SAM_PATCH:
            raise _bad("sam.img_size", f"{self.img_size} is not a multiple of SAM's {SAM_PATCH}-px patch")

    @property
    def prompt_dim(self) -> int:
        return SAM_VARIANTS[self.variant].prompt_dim


@dataclass(frozen=True)
class RegionSection:
    """The region encoder (width: CLIP hidden size in, LLM hidden size out)."""

    levels: int = 4
    roi_size: int = 14
    roi_frame: Literal["clip", "224"] = "clip"
    """``224``: the reference's box scaling (released checkpoints); ``clip``: the fixed one."""
    fuse_rounds: int = 5
    sampling_ratio: int = 2
    gn_groups: int = 64
    pos_hidden: int = 256

    def encoder_kwargs(self) -> dict[str, Any]:
        """``RegionEncoder`` keyword arguments (its widths come from CLIP and the LLM)."""
        return {
            "num_levels": self.levels,
            "roi_size": self.roi_size,
            "fuse_rounds": self.fuse_rounds,
            "sampling_ratio": self.sampling_ratio,
            "roi_frame": self.roi_frame,
            "gn_groups": self.gn_groups,
            "pos_hidden": self.pos_hidden,
        }

    def __post_init__(self) -> None:
        _positive(
            "region", self, "levels", "roi_size", "fuse_rounds", "sampling_ratio", "gn_groups", "pos_hidden"
        )


@dataclass(frozen=True)
class LossSection:
    """``loss = ce * CE + bce * BCE + dice * Dice`` (the reference's weights)."""

    ce: float = 1.0
    bce: float = 2.0
    dice: float = 0.5

    def __post_init__(self) -> None:
        for name in ("ce", "bce", "dice"):
            if getattr(self, name) < 0:
                raise _bad(f"loss.{name}", f"must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class ModelConfig:
    """Every size and switch of the GLaMM model (module docstring)."""

    clip: ClipSection = field(default_factory=ClipSection)
    llm: LlmSection = field(default_factory=LlmSection)
    lora: LoraSection = field(default_factory=LoraSection)
    sam: SamSection = field(default_factory=SamSection)
    region: RegionSection = field(default_factory=RegionSection)
    loss: LossSection = field(default_factory=LossSection)
    lp_dim: int = 256
    """L-P projection output: the [SEG] prompt width, equal to SAM's prompt dimension."""
    vl_projection: Literal["frozen", "trained"] = "trained"
    embeddings: Literal["full", "new_rows"] = "new_rows"
    """Train whole embedding / LM-head matrices (reference) or only GLaMM's new token rows."""
    clip_preprocess: Literal["pad", "center_crop"] = "pad"

    def __post_init__(self) -> None:
        if self.lp_dim != self.sam.prompt_dim:
            raise _bad(
                "lp_dim",
                f"{self.lp_dim} must equal SAM {self.sam.variant}'s prompt dim {self.sam.prompt_dim}",
            )
        if self.clip.hidden_size % self.region.gn_groups:
            raise _bad(
                "region.gn_groups",
                f"{self.region.gn_groups} does not divide the region width (clip.hidden_size {self.clip.hidden_size})",
            )
        self.clip.level_indices(self.region.levels)
        if self.num_image_tokens >= self.llm.max_positions:
            raise _bad(
                "llm.max_positions",
                f"{self.llm.max_positions} leaves no room after {self.num_image_tokens} image tokens",
            )

    @property
    def num_image_tokens(self) -> int:
        """Patch embeddings one ``<image>`` placeholder expands to (576 for ViT-L/14 at 336)."""
        return self.clip.num_patches

    @property
    def region_levels(self) -> list[int]:
        return self.clip.level_indices(self.region.levels)

    def data_config(self, **overrides: Any) -> DataConfig:
        """A ``DataConfig`` whose image sizes, token count and preprocessing match this model."""
        base = DataConfig(
            clip_size=self.clip.image_size,
            sam_size=self.sam.img_size,
            num_image_tokens=self.num_image_tokens,
            preprocess=self.clip_preprocess,
        )
        return replace(base, **overrides)
