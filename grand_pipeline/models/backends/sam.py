"""Segment Anything (``segment-anything`` package) as the full profile's box segmenter.

Weights: an official checkpoint (``sam_vit_h_4b8939.pth``, ``sam_vit_l_0b3195.pth``,
``sam_vit_b_01ec64.pth``) is a plain state dict, so the network is built from the package's own
building blocks with the variant's hyperparameters and the file is read with
``torch.load(weights_only=True)``; ``build_sam`` itself calls ``torch.load`` without it.
``tiny:<seed>`` writes a random state dict of the ``tiny`` variant (same input size, small dims)
and loads it through the same function.

Inference follows ``SamPredictor``: longest side resized to 1024, pixel mean/std, zero padding to
1024x1024, one image-encoder pass per image, boxes decoded ``batch_size`` at a time with
``multimask_output=False``, logits cropped and upsampled to (H, W), thresholded at 0.
``segment_boxed`` keeps the thresholded masks on the device, cropped to their tight boxes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from grand_pipeline.geometry.boxed import BoxedMasks
from grand_pipeline.models import weights
from grand_pipeline.models.mask_logits import boxed_from_logits, dense_with_scores
from grand_pipeline.models.roles import Segmenter, register_backend
from grand_pipeline.models.vision_common import check_images, runtime, seeded_build, to_device

logger = logging.getLogger(__name__)

IMAGE_SIZE = 1024
PATCH = 16
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
TINY_FILE = "sam_tiny.pth"


@dataclass(frozen=True)
class SamVariant:
    encoder_dim: int
    depth: int
    heads: int
    global_attn: tuple[int, ...]
    prompt_dim: int = 256
    decoder_mlp: int = 2048
    decoder_heads: int = 8


#: The three published sizes (segment_anything/build_sam.py) and a tiny one for tests.
VARIANTS: dict[str, SamVariant] = {
    "vit_h": SamVariant(1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": SamVariant(1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": SamVariant(768, 12, 12, (2, 5, 8, 11)),
    "tiny": SamVariant(32, 2, 2, (1,), prompt_dim=32, decoder_mlp=64, decoder_heads=2),
}


def build_sam(variant: str, img_size: int = IMAGE_SIZE) -> torch.nn.Module:
    """An untrained ``Sam`` of ``variant`` (``segment_anything._build_sam`` without its torch.load).

    ``img_size`` (a multiple of the 16-px patch) is the square input side; the published
    checkpoints and this backend use 1024, GLaMM's tiny training model a small one such as 128.
    """
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    if variant not in VARIANTS:
        raise ValueError(f"sam: unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    if img_size <= 0 or img_size % PATCH:
        raise ValueError(f"sam: img_size {img_size} is not a positive multiple of the {PATCH}-px patch")
    v = VARIANTS[variant]
    grid = img_size // PATCH
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=v.depth,
            embed_dim=v.encoder_dim,
            img_size=img_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=v.heads,
            patch_size=PATCH,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=v.global_attn,
            window_size=14,
            out_chans=v.prompt_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=v.prompt_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(img_size, img_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=v.prompt_dim, mlp_dim=v.decoder_mlp, num_heads=v.decoder_heads
            ),
            transformer_dim=v.prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=v.prompt_dim,
        ),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    ).eval()


def build_tiny(folder: Path, seed: int) -> None:
    """A random ``tiny`` Sam state dict, saved like an official checkpoint."""
    torch.save(seeded_build(seed, lambda: build_sam("tiny")).state_dict(), folder / TINY_FILE)


def load_sam(path: Path, variant: str) -> torch.nn.Module:
    """Build ``variant`` and load the state dict at ``path`` (a .pth file or a folder with one)."""
    if path.is_dir():
        found = sorted(path.rglob("*.pth"))  # rglob: a hub snapshot may keep them in checkpoints/
        if len(found) != 1:
            names = ", ".join(str(f.relative_to(path)) for f in found) or "none"
            raise weights.ModelSourceError(
                f"sam: expected one .pth file in {path} (found: {names}); name it with options.checkpoint"
            )
        path = found[0]
    net = build_sam(variant)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return net


@dataclass(frozen=True)
class SamOptions:
    checkpoint: str | None = None
    """The ``.pth`` file inside a weights folder that holds several."""
    variant: str | None = None
    """vit_h | vit_l | vit_b (None: vit_h; ``tiny`` for ``tiny:`` weights)."""
    mask_threshold: float = 0.0
    """Cut on the mask logits (segment-anything's own default)."""


@register_backend("segmenter", "sam", options=SamOptions)
class SamSegmenter(Segmenter):
    """Box prompts -> masks with exactly one image embedding per image.

    Options: ``variant`` vit_h (tiny for ``tiny:`` sources) | vit_l | vit_b | tiny,
    ``mask_threshold`` 0.0 (logit), ``checkpoint`` (a file inside the weights folder, e.g.
    ``sam_vit_h_4b8939.pth`` when the folder holds several). ``spec.batch_size`` boxes go through the decoder at a time.
    """

    def __init__(self, spec: Any, hub: Any = None) -> None:
        super().__init__(spec, hub)
        opts: SamOptions = self.opts
        resolved = weights.resolve(str(spec.model or ""), name="sam", tiny_builder=build_tiny)
        path = resolved.path / opts.checkpoint if opts.checkpoint else resolved.path
        is_tiny = resolved.source.startswith("tiny:")
        self.variant = opts.variant or ("tiny" if is_tiny else "vit_h")
        self.mask_threshold = opts.mask_threshold
        self.batch_size = max(1, int(getattr(spec, "batch_size", 8)))
        self.device, self.dtype = runtime(spec)
        # Any: the Sam submodules and their extra methods (get_dense_pe) are not typed on nn.Module.
        self.net: Any = load_sam(path, self.variant).to(self.device, self.dtype)
        self.weights_id = resolved.sha256
        self.model_id = f"sam-{self.variant}" + (f"-random({resolved.source})" if is_tiny else "")
        logger.info("sam: %s on %s (%s)", self.model_id, self.device, self.dtype)

    def _preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, int, int]:
        """uint8 (H, W, 3) -> normalised, padded (1, 3, 1024, 1024) on the device, resized (h, w)."""
        height, width = image.shape[:2]
        scale = IMAGE_SIZE / max(height, width)
        new_h, new_w = int(height * scale + 0.5), int(width * scale + 0.5)
        x = to_device(torch.from_numpy(image).permute(2, 0, 1)[None], self.device).float()
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(PIXEL_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(PIXEL_STD, device=self.device).view(1, 3, 1, 1)
        x = F.pad((x - mean) / std, (0, IMAGE_SIZE - new_w, 0, IMAGE_SIZE - new_h))
        return x.to(self.dtype), new_h, new_w

    def _masks(
        self, image: np.ndarray, boxes: np.ndarray
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(box index, logits (H, W) float32, predicted IoU ()) per box, on the device.

        The decoder runs ``batch_size`` boxes at a time; each mask goes to (H, W) on its own, so
        full-resolution memory is one mask's logits whatever N is (a batch of them was
        ``batch_size`` x 4 bytes x H*W). Upsampling is per mask anyway, so the values are the same.

        Callers iterate it inside ``torch.inference_mode()`` (a ``with`` in a generator would stay
        entered, thread-wide, while the generator is suspended).

        ``image`` is checked RGB uint8; ``boxes`` (N >= 1, 4) float32 xyxy pixels.
        """
        height, width = image.shape[:2]
        scale = IMAGE_SIZE / max(height, width)
        x, new_h, new_w = self._preprocess(image)
        embedding = self.net.image_encoder(x)  # (1, C, 64, 64): the one encoder pass
        dense_pe = self.net.prompt_encoder.get_dense_pe()
        for lo in range(0, len(boxes), self.batch_size):
            chunk = to_device(torch.from_numpy(boxes[lo : lo + self.batch_size] * scale), self.device)
            sparse, dense = self.net.prompt_encoder(points=None, boxes=chunk, masks=None)
            low_res, iou = self.net.mask_decoder(
                image_embeddings=embedding,
                image_pe=dense_pe,
                sparse_prompt_embeddings=sparse.to(self.dtype),
                dense_prompt_embeddings=dense.to(self.dtype),
                multimask_output=False,
            )
            # As Sam.postprocess_masks: to the padded 1024 frame, crop the padding, then to (H, W).
            logits = F.interpolate(
                low_res.float(), (IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False
            )
            logits = logits[..., :new_h, :new_w]
            for k in range(len(logits)):
                full = F.interpolate(logits[k : k + 1], (height, width), mode="bilinear", align_corners=False)
                yield lo + k, full[0, 0], iou[k, 0].float()

    def segment_with_scores(
        self, image: np.ndarray, boxes: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks bool (N, H, W), predicted IoU float32 (N,), stability score float32 (N,)."""
        (image,) = check_images([image], "sam")
        b = np.asarray(boxes, np.float32).reshape(-1, 4)
        with torch.inference_mode():
            pieces = self._masks(image, b) if len(b) else ()
            # SAM's stability score centres on its mask threshold.
            return dense_with_scores(
                pieces, len(b), image.shape[:2], self.mask_threshold, self.mask_threshold
            )

    def segment(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Box prompts (N, 4) xyxy -> bool (N, H, W) masks; one image embedding per call."""
        return self.segment_with_scores(image, boxes)[0]

    def segment_boxed(self, image: np.ndarray, boxes: np.ndarray) -> BoxedMasks:
        """``segment``'s masks kept on the device as tight-box crops (Level 1's ``ObjectMasks``).

        Upsampling and thresholding happen on the device as in ``segment``, one mask at a time;
        only each mask's tight box is kept there, and nothing full-resolution comes back to the host.
        """
        (image,) = check_images([image], "sam")
        b = np.asarray(boxes, np.float32).reshape(-1, 4)
        with torch.inference_mode():
            pieces = self._masks(image, b) if len(b) else ()
            return boxed_from_logits(pieces, image.shape[:2], self.mask_threshold, self.device)
