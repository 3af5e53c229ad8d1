"""Label assigner ``clip_labels``: CLIP scores each object crop against its candidate labels.

The reference settles an object's label among the labels the detectors gave it by scoring the
object crop with CLIP (EVA-CLIP there) against one prompt per candidate; the best one wins.
This is that, with any CLIP-family checkpoint in Hugging Face layout (``CLIPModel``; e.g.
``hf:openai/clip-vit-large-patch14@<rev>``).

``ClipScorer`` is the shared part: one per model hub and weights folder (``hf_common.shared``), so
``clip_landmark`` on the same weights reuses it. The network itself is loaded with
``clip_tagger.load_clip`` under the tagger's sharing key, so a hub that also builds the
``clip_tagger`` on the same weights keeps a single CLIP. Text features are cached (labels and
landmark prompts repeat across images). Crops are cut on CLIP's device and its
(torchvision-backed) image processor resizes them there.

``tiny:<seed>`` saves a random CLIP (ViT 32 px / patch 8, 2-layer text tower, 16-d projection)
with an offline word-level tokenizer and a 32 px ``CLIPImageProcessor``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from grand_pipeline.config import check_ranges
from grand_pipeline.models import hf_common
from grand_pipeline.models.backends.clip_tagger import load_clip as load_clip_folder
from grand_pipeline.models.roles import LabelAssigner, register_backend
from grand_pipeline.models.vision_common import region_crops, to_device

logger = logging.getLogger(__name__)

TEMPLATE = "a photo of a {}."


def build_tiny(folder: Path, seed: int) -> None:
    """A seeded random CLIP with an offline tokenizer and image processor, in transformers layout."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = hf_common.tiny_tokenizer(wrap=True)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77,
                     "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )  # fmt: skip
    model = hf_common.seeded(seed, lambda: CLIPModel(config))
    image = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    with hf_common.quiet():
        model.save_pretrained(str(folder), safe_serialization=True)
        CLIPProcessor(image_processor=image, tokenizer=tokenizer).save_pretrained(str(folder))


def _features(out: Any) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _as_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        return image
    arr = np.asarray(image)
    return torch.from_numpy(np.ascontiguousarray(arr) if arr.flags.writeable else arr.copy())


def _as_array(image: np.ndarray | torch.Tensor) -> np.ndarray:
    return image.cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)


class ClipScorer:
    """Unit-norm CLIP image and text embeddings, float32 numpy; one instance per hub and folder."""

    def __init__(self, model: Any, processor: Any, device: torch.device, dtype: torch.dtype, batch_size: int) -> None:
        self.model, self.tokenizer, self.image_processor = model, processor.tokenizer, processor.image_processor
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        #: CLIP's learned temperature: cosines times this are the logits CLIP was trained on.
        self.logit_scale = float(self.model.logit_scale.exp().item())
        self._text_cache: dict[str, np.ndarray] = {}
        mro = {cls.__name__ for cls in type(self.image_processor).__mro__}
        self.on_device = "TorchvisionBackend" in mro

    def images(self, images: Sequence[np.ndarray | torch.Tensor]) -> np.ndarray:
        """(N, D) embeddings of (H, W, 3) uint8 images, numpy or tensors (e.g. crops on the device)."""
        out = []
        for lo in range(0, len(images), self.batch_size):
            pixels = self._pixels(images[lo : lo + self.batch_size])
            with torch.inference_mode():
                feats = _features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy())
        dim = int(self.model.config.projection_dim)
        return np.concatenate(out) if out else np.zeros((0, dim), np.float32)

    def _pixels(self, images: Sequence[np.ndarray | torch.Tensor]) -> torch.Tensor:
        """The processor's pixel_values. A torchvision-backed processor resizes and normalises on
        the model's device, from uint8 tensors (channels last, given explicitly: a crop 3 px high
        would otherwise read as channels first); it gives the same values as from PIL images."""
        if self.on_device:
            tensors = [to_device(_as_tensor(img), self.device) for img in images]
            return self.image_processor(
                images=tensors, return_tensors="pt", device=self.device, input_data_format="channels_last"
            )["pixel_values"]
        pictures = [Image.fromarray(np.ascontiguousarray(_as_array(img))) for img in images]
        return self.image_processor(images=pictures, return_tensors="pt")["pixel_values"]

    def texts(self, texts: list[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        for lo in range(0, len(missing), self.batch_size):
            batch = missing[lo : lo + self.batch_size]
            enc = self.tokenizer(
                batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            enc.pop("token_type_ids", None)
            with torch.inference_mode():
                feats = _features(self.model.get_text_features(**enc))
            for text, row in zip(batch, torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy(), strict=True):
                self._text_cache[text] = row
        dim = int(self.model.config.projection_dim)
        return np.stack([self._text_cache[t] for t in texts]) if texts else np.zeros((0, dim), np.float32)


def load_clip(spec: Any, name: str, hub: Any) -> tuple[ClipScorer, str, str]:
    """(``hub``'s shared scorer, weights id, model id) for ``spec.model``."""
    # One tiny name for both roles, so that tiny:<seed> is also one folder and one shared model.
    resolved = hf_common.load_folder(spec, name="clip", tiny_builder=build_tiny)
    device = hf_common.device_of(spec)
    dtype = hf_common.torch_dtype(spec, device)
    batch_size = max(1, int(getattr(spec, "batch_size", 32)))

    def load_model() -> tuple[Any, Any]:
        model, processor = load_clip_folder(resolved.path, dtype)  # from_pretrained(local_files_only)
        return model.to(device), processor

    model, processor = hf_common.shared(hub, f"clip:{device}:{dtype}", resolved.path, load_model)
    scorer = hf_common.shared(
        hub, f"clip-scorer:{device}:{dtype}", resolved.path,
        lambda: ClipScorer(model, processor, device, dtype, batch_size),
    )  # fmt: skip
    logger.info("%s: CLIP from %s on %s (%s)", name, resolved.path, device, dtype)
    tiny = resolved.source.startswith("tiny:")
    return scorer, resolved.sha256, f"clip-random({resolved.source})" if tiny else str(spec.model)


@dataclass(frozen=True)
class ClipLabelsOptions:
    template: str = TEMPLATE
    pad: float = 0.1
    """Crop padding, a fraction of the box side."""

    def validate(self) -> None:
        check_ranges(self, non_negative=("pad",))


@register_backend("label_assigner", "clip_labels", options=ClipLabelsOptions)
class ClipLabelAssigner(LabelAssigner):
    """argmax over a box's candidates of cos(crop, "a photo of a <label>.").

    Options: :class:`ClipLabelsOptions`.
    Without an image (``image=None``), candidates are scored against the context text instead.
    """

    def __init__(self, spec: Any, hub: Any = None) -> None:
        super().__init__(spec, hub)
        self.template = self.opts.template
        self.pad = self.opts.pad
        self.clip, self.weights_id, self.model_id = load_clip(spec, "clip_labels", hub)

    def assign(
        self, image: np.ndarray | None, boxes: np.ndarray, candidates: list[list[str]], context: str
    ) -> list[str]:
        """One label per box; a box with one candidate keeps it without running CLIP."""
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        if len(candidates) != len(boxes):
            raise ValueError(f"{len(candidates)} candidate lists for {len(boxes)} boxes")
        if any(not c for c in candidates):
            raise ValueError("every box needs at least one candidate label")
        out = [str(c[0]) for c in candidates]
        ambiguous = [i for i, c in enumerate(candidates) if len(c) > 1]
        if not ambiguous or (image is None and not context.strip()):
            return out
        if image is not None:
            # Crops cut on CLIP's device, where its processor resizes them.
            crops = region_crops(image, boxes[ambiguous], None, self.pad, self.clip.device)
            queries = self.clip.images(crops)
        else:
            queries = np.repeat(self.clip.texts([context]), len(ambiguous), axis=0)
        for query, i in zip(queries, ambiguous, strict=True):
            labels = [str(c) for c in candidates[i]]
            scores = self.clip.texts([self.template.format(label) for label in labels]) @ query
            out[i] = labels[int(np.argmax(scores))]
        return out
