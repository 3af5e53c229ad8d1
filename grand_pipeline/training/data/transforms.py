"""GLaMM's two image inputs, and boxes mapped into the CLIP one.

**CLIP** (global image, ``C x C``): ``pad`` pastes the image centred on a square of the CLIP mean
colour (LLaVA's ``expand2square``) and resizes it to C, so nothing is cut off; ``center_crop``
resizes the short side to C and crops the centre (``CLIPImageProcessor``, what the released GLaMM
checkpoints saw). Both are an axis-aligned affine map ``x' = x * sx - ox`` (:class:`ClipFrame`), and
region boxes go through *that same* map, then are divided by C: normalised xyxy in the frame the
region encoder pools from, clipped to [0, 1]. (The reference squashes boxes to the square instead,
which misplaces them under either transform.)

**SAM** (grounding image, ``S x S``): ``ResizeLongestSide(S)`` (long side to S, the other side
rounded), zero-padded bottom-right to S. ``resize_list`` holds the resized (h, w) so predicted
masks can be cropped before upsampling back to the original H x W.

**uint8 out, normalised on the device.** Both inputs leave the loader as uint8 tensors; the mean/std
normalisation (``normalise_clip``, ``normalise_sam``) runs where the model runs. A float SAM input
is 12 MB per image and normalising it on the CPU cost a data worker more than decoding the JPEG and
every mask together (``make bench``); on a GPU it is a few microseconds, and the host-to-device copy
is 4x smaller. Resizing uses OpenCV when it is installed (bicubic up, area down: the anti-aliased
choices, as PIL's bicubic is), several times faster than PIL, which is the fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

try:  # opencv-python comes with the full extra (ultralytics); PIL is the fallback
    import cv2
except ImportError:  # pragma: no cover - exercised only without OpenCV
    cv2 = None  # type: ignore[assignment]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAM_MEAN = (123.675, 116.28, 103.53)  # on 0..255 pixels
SAM_STD = (58.395, 57.12, 57.375)

#: ``pad``'s background: the CLIP mean colour, which normalises to zero.
CLIP_FILL = np.array([round(m * 255) for m in CLIP_MEAN], dtype=np.uint8)

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


def _resize(image: np.ndarray, height: int, width: int, bicubic: bool = True) -> np.ndarray:
    """Resize an H x W x 3 uint8 image. Enlarging: bicubic (CLIP's processor) or bilinear (SAM's
    ``ResizeLongestSide`` goes through torchvision's bilinear resize). Shrinking by more than 2x:
    area-averaged, the anti-aliased choice; by less, bilinear already reads every source pixel,
    and OpenCV's area filter at such ratios costs 7x more for a near-identical image."""
    if image.shape[:2] == (height, width):
        return image
    scale = min(height / image.shape[0], width / image.shape[1])
    if cv2 is not None:
        if scale < 0.5:
            flag = cv2.INTER_AREA
        else:
            flag = cv2.INTER_CUBIC if bicubic and scale > 1 else cv2.INTER_LINEAR
        return cv2.resize(image, (width, height), interpolation=flag)
    method = Image.Resampling.BICUBIC if bicubic else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(image).resize((width, height), method))


def _normalised(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], scale: float) -> torch.Tensor:
    shape = (1, 3, 1, 1)
    m = torch.tensor(mean, device=images.device).view(shape)
    sd = torch.tensor(std, device=images.device).view(shape)
    return (images.float() * scale - m) / sd


def normalise_clip(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, C, C] uint8 CLIP inputs -> float32 ``(pixel / 255 - mean) / std`` on their device."""
    return _normalised(images, CLIP_MEAN, CLIP_STD, 1 / 255)


def normalise_sam(images: torch.Tensor, resize_list: list[tuple[int, int]]) -> torch.Tensor:
    """[B, 3, S, S] uint8 SAM inputs -> float32 ``(pixel - mean) / std`` with the padding (beyond
    each image's resized (h, w)) at 0, as SAM's own preprocessing leaves it."""
    out = _normalised(images, SAM_MEAN, SAM_STD, 1.0)
    size = images.shape[-1]
    rows = torch.arange(size, device=images.device)
    h = torch.tensor([hw[0] for hw in resize_list], device=images.device).view(-1, 1, 1, 1)
    w = torch.tensor([hw[1] for hw in resize_list], device=images.device).view(-1, 1, 1, 1)
    inside = (rows.view(1, 1, -1, 1) < h) & (rows.view(1, 1, 1, -1) < w)
    return out * inside


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


def _hwc_view(image: np.ndarray) -> torch.Tensor:
    """An H x W x 3 uint8 array as a 3 x H x W tensor *view* (channels-last memory, no copy);
    ``collate`` stacks such views with one memcpy each, and the device makes them contiguous."""
    return torch.from_numpy(image).permute(2, 0, 1)


def clip_image(image: np.ndarray, size: int, mode: ClipMode) -> tuple[torch.Tensor, ClipFrame]:
    """``image`` (H x W x 3 uint8) -> (3 x size x size uint8 CLIP input, its :class:`ClipFrame`)."""
    height, width = image.shape[:2]
    frame = clip_frame(height, width, size, mode)
    if mode == "pad":
        # Resize first, then paste into a square of the mean colour: the same pixels as padding
        # at full resolution and resizing the square, without touching the padding's pixels twice.
        new_h, new_w = max(1, round(height * frame.sy)), max(1, round(width * frame.sx))
        top, left = int(round(-frame.oy)), int(round(-frame.ox))
        new_h, new_w = min(new_h, size - top), min(new_w, size - left)
        if (new_h, new_w) == (size, size):
            out = np.ascontiguousarray(_resize(image, size, size))  # square: no padding to fill
        else:
            # One row of the fill colour, then row copies: 70x faster than broadcasting the
            # 3-vector over every pixel (numpy's per-element broadcast loop).
            out = np.tile(np.tile(CLIP_FILL, size), (size, 1)).reshape(size, size, 3)
            out[top : top + new_h, left : left + new_w] = _resize(image, new_h, new_w)
    else:
        new_h, new_w = _short_side_size(height, width, size)
        resized = _resize(image, new_h, new_w)
        top, left = int(frame.oy), int(frame.ox)
        out = np.ascontiguousarray(resized[top : top + size, left : left + size])
    return _hwc_view(out), frame


def sam_resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """``ResizeLongestSide(size)``'s (h, w): the long side becomes ``size``, the other rounds half up."""
    scale = size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def sam_image(image: np.ndarray, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``image`` (H x W x 3 uint8) -> (3 x size x size uint8 SAM input, zero-padded; resized (h, w))."""
    new_h, new_w = sam_resized_size(image.shape[0], image.shape[1], size)
    # np.empty + explicit zeroing of the margins: a fresh np.zeros buffer of this size is calloc'ed
    # and page-faulted on write, which cost 5x the resize itself (measured, 1024 px).
    padded = np.empty((size, size, 3), dtype=np.uint8)
    padded[:new_h, :new_w] = _resize(image, new_h, new_w, bicubic=False)
    padded[new_h:] = 0
    padded[:new_h, new_w:] = 0
    return _hwc_view(padded), (new_h, new_w)
