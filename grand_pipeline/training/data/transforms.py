"""GLaMM's two image inputs, and boxes mapped into the CLIP one.

**CLIP** (global image, ``C x C``): ``pad`` pastes the image centred on a square of the CLIP mean
colour (LLaVA's ``expand2square``) and resizes it to C, so nothing is cut off; ``center_crop``
resizes the short side to C and crops the centre (``CLIPImageProcessor``, what the released GLaMM
checkpoints saw). Both are an axis-aligned affine map ``x' = x * sx - ox`` (:class:`ClipFrame`), and
region boxes go through *that same* map, then are divided by C: normalised xyxy in the frame the
region encoder pools from, clipped to [0, 1]. (The reference squashes boxes to the square instead,
which misplaces them under either transform.)

**SAM** (grounding image, ``S x S``): ``ResizeLongestSide(S)`` (long side to S, the other side
rounded), SAM's pixel mean/std, zero-padded bottom-right to S. ``resize_list`` holds the resized
(h, w) so predicted masks can be cropped before upsampling back to the original H x W.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAM_MEAN = (123.675, 116.28, 103.53)  # on 0..255 pixels
SAM_STD = (58.395, 57.12, 57.375)

ClipMode = Literal["pad", "center_crop"]
CLIP_MODES = ("pad", "center_crop")


@dataclass(frozen=True)
class ClipFrame:
    """The map from original pixels (x, y) to the CLIP input: ``(x * sx - ox, y * sy - oy)``."""

    size: int
    sx: float
    sy: float
    ox: float
    oy: float

    def boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Map ``boxes`` (N x 4 xyxy, original pixels) to N x 4 xyxy normalised to the C x C input,
        clipped to [0, 1] (a box, or part of one, cut off by ``center_crop`` is clipped)."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        out = np.empty_like(b)
        out[:, 0::2] = (b[:, 0::2] * self.sx - self.ox) / self.size
        out[:, 1::2] = (b[:, 1::2] * self.sy - self.oy) / self.size
        return np.clip(out, 0.0, 1.0)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of an H x W x 3 uint8 image (PIL, as CLIP's and SAM's processors do)."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


def _normalise(
    image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...], scale: float
) -> torch.Tensor:
    """H x W x 3 uint8 -> 3 x H x W float32 ``(pixel * scale - mean) / std``."""
    tensor = (
        torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() * scale
    )  # own copy: PIL arrays are read-only
    return (tensor - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def clip_frame(height: int, width: int, size: int, mode: ClipMode) -> ClipFrame:
    """The :class:`ClipFrame` of an ``height x width`` image under ``mode``."""
    if mode == "pad":
        side = max(height, width)
        scale = size / side
        return ClipFrame(size, scale, scale, -((side - width) // 2) * scale, -((side - height) // 2) * scale)
    if mode == "center_crop":
        new_h, new_w = _short_side_size(height, width, size)
        return ClipFrame(size, new_w / width, new_h / height, (new_w - size) // 2, (new_h - size) // 2)
    raise ValueError(f"preprocess must be one of {', '.join(CLIP_MODES)}, got {mode!r}")


def _short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) with the short side ``size`` and the aspect ratio kept (the long side rounded)."""
    if height <= width:
        return size, max(size, round(width * size / height))
    return max(size, round(height * size / width)), size


def clip_image(image: np.ndarray, size: int, mode: ClipMode) -> tuple[torch.Tensor, ClipFrame]:
    """``image`` (H x W x 3 uint8) -> (3 x size x size float32 CLIP input, its :class:`ClipFrame`)."""
    height, width = image.shape[:2]
    frame = clip_frame(height, width, size, mode)
    if mode == "pad":
        side = max(height, width)
        fill = np.array([round(m * 255) for m in CLIP_MEAN], dtype=np.uint8)
        square = np.empty((side, side, 3), dtype=np.uint8)
        square[:] = fill
        top, left = (side - height) // 2, (side - width) // 2
        square[top : top + height, left : left + width] = image
        out = _resize(square, size, size)
    else:
        new_h, new_w = _short_side_size(height, width, size)
        resized = _resize(image, new_h, new_w)
        top, left = int(frame.oy), int(frame.ox)
        out = resized[top : top + size, left : left + size]
    return _normalise(out, CLIP_MEAN, CLIP_STD, 1 / 255), frame


def sam_resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """``ResizeLongestSide(size)``'s (h, w): the long side becomes ``size``, the other rounds half up."""
    scale = size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def sam_image(image: np.ndarray, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``image`` (H x W x 3 uint8) -> (3 x size x size float32 SAM input, resized (h, w))."""
    new_h, new_w = sam_resized_size(image.shape[0], image.shape[1], size)
    tensor = _normalise(_resize(image, new_h, new_w), SAM_MEAN, SAM_STD, 1.0)
    padded = torch.zeros(3, size, size, dtype=torch.float32)
    padded[:, :new_h, :new_w] = tensor
    return padded, (new_h, new_w)
