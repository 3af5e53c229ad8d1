"""GLaMM's one change to SAM, rebuilt around the stock ``segment_anything.modeling`` modules.

GLaMM's ``PromptEncoder`` takes an extra ``text_embeds``: with no points, boxes or masks, each
``[SEG]`` embedding (the L-P projection of the LLM state that predicted ``[SEG]``) becomes the one
sparse prompt token of its mask, and the dense prompt is the learnt ``no_mask_embed`` broadcast to
one map per ``[SEG]``. Here the stock encoder is called with all prompts empty and the ``[SEG]``
embeddings are appended outside it, so upstream SAM modules and checkpoints are used unchanged.

The decoder runs with ``multimask_output=False`` (mask token 0); its low-resolution logits are
brought back to the original image exactly as ``Sam.postprocess_masks``: upsample to the SAM
square, crop the bottom-right padding, upsample to (H, W).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from grand_pipeline.models.backends.sam import build_sam
from grand_pipeline.models.vision_common import seeded_build

__all__ = ["decode_masks", "postprocess_masks", "seg_prompts", "tiny_sam"]


def seg_prompts(prompt_encoder: Any, seg_embeddings: Tensor) -> tuple[Tensor, Tensor]:
    """``[SEG]`` embeddings -> SAM prompt embeddings, one prompt per mask.

    Args:
        prompt_encoder: a ``segment_anything.modeling.PromptEncoder`` (embed dim C, grid h x w).
        seg_embeddings: [n, C] projected ``[SEG]`` states of one image.
    Returns:
        sparse [n, 1, C] (the ``[SEG]`` embedding as the only token) and dense [n, C, h, w]
        (``no_mask_embed`` expanded), both in ``seg_embeddings``' dtype.
    """
    if seg_embeddings.ndim != 2 or seg_embeddings.shape[1] != prompt_encoder.embed_dim:
        raise ValueError(
            f"sam: [SEG] embeddings must be [n, {prompt_encoder.embed_dim}], got {tuple(seg_embeddings.shape)}"
        )
    n, dim = seg_embeddings.shape
    # The encoder's own empty-prompt path, so a change in how SAM embeds "no prompt" is followed.
    sparse, dense = prompt_encoder(points=None, boxes=None, masks=None)
    sparse = torch.cat([sparse.to(seg_embeddings).expand(n, 0, dim), seg_embeddings[:, None]], dim=1)
    return sparse, dense.to(seg_embeddings.dtype).expand(n, -1, -1, -1)


def decode_masks(
    mask_decoder: Any, prompt_encoder: Any, image_embedding: Tensor, seg_embeddings: Tensor
) -> tuple[Tensor, Tensor]:
    """One image's ``[SEG]`` embeddings -> single-mask SAM predictions.

    Args:
        mask_decoder: a ``segment_anything.modeling.MaskDecoder``.
        prompt_encoder: the matching ``PromptEncoder`` (dense positional encoding, empty prompts).
        image_embedding: [1, C, h, w] image-encoder output of this image.
        seg_embeddings: [n, C].
    Returns:
        low-res logits [n, 1, 4h, 4w] and predicted IoU [n, 1].
    """
    if image_embedding.ndim != 4 or image_embedding.shape[0] != 1:
        # The decoder repeats the embedding once per prompt; a batch here would mix images.
        raise ValueError(
            f"sam: expected one image embedding [1, C, h, w], got {tuple(image_embedding.shape)}"
        )
    n = seg_embeddings.shape[0]
    if n == 0:
        # The decoder cannot reshape an empty batch; decode one zero prompt and keep none of it,
        # which gives correctly sized empty outputs still linked to the decoder's parameters.
        low_res, iou = decode_masks(
            mask_decoder,
            prompt_encoder,
            image_embedding,
            seg_embeddings.new_zeros(1, seg_embeddings.shape[1]),
        )
        return low_res[:0], iou[:0]
    sparse, dense = seg_prompts(prompt_encoder, seg_embeddings)
    return mask_decoder(
        image_embeddings=image_embedding,
        image_pe=prompt_encoder.get_dense_pe().to(image_embedding.dtype),
        sparse_prompt_embeddings=sparse.to(image_embedding.dtype),
        dense_prompt_embeddings=dense.to(image_embedding.dtype),
        multimask_output=False,
    )


def postprocess_masks(
    low_res: Tensor, input_size: tuple[int, int], original_size: tuple[int, int], sam_size: int
) -> Tensor:
    """Low-res logits -> logits at the original image size.

    Args:
        low_res: [n, 1, h, w] decoder logits over the padded ``sam_size`` square.
        input_size: (h, w) of the resized image inside the square (the rest is padding).
        original_size: (H, W) of the image before SAM's resize.
        sam_size: side of SAM's square input (the image encoder's ``img_size``).
    Returns:
        [n, H, W] logits (threshold at 0 for masks).
    """
    h, w = input_size
    if not (0 < h <= sam_size and 0 < w <= sam_size):
        raise ValueError(f"sam: input_size {input_size} does not fit the {sam_size}-px square")
    logits = F.interpolate(low_res, (sam_size, sam_size), mode="bilinear", align_corners=False)
    logits = logits[..., :h, :w]  # the padding was never image: crop it before the final resize
    logits = F.interpolate(logits, tuple(original_size), mode="bilinear", align_corners=False)
    return logits[:, 0]


def tiny_sam(img_size: int = 128, seed: int = 0) -> Any:
    """A random ``tiny`` SAM (dims 32) with a ``img_size`` square input, for CPU tests and training.

    Its image embedding is [1, 32, img_size/16, img_size/16] and its low-res masks are 4x that.
    """
    return seeded_build(seed, lambda: build_sam("tiny", img_size=img_size))
