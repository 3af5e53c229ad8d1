"""Monocular depth through transformers: DPT / MiDaS (``DPTForDepthEstimation``) and Depth-Anything
(V1/V2), both via ``AutoModelForDepthEstimation`` from a local folder.

Output convention: the role wants relative inverse depth (larger = nearer). DPT/MiDaS and the
relative Depth-Anything checkpoints already predict that (disparity-like). Metric checkpoints
(Depth-Anything ``depth_estimation_type: metric``, ZoeDepth, GLPN) predict distance in metres,
larger = farther, so they are inverted (1 / max(d, eps)). The convention is read from the model's
config; option ``output`` (inverse | metric) overrides it for an unusual checkpoint.

Batching: the image processors keep the aspect ratio, so images of one micro-batch are grouped by
their processed size and each group runs as one forward pass. Each prediction is resized back to
its image's (H, W) with bicubic interpolation, as the processors' own post-processing does.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from grand_pipeline.models.hf_common import load_folder, load_pretrained, shared_pretrained
from grand_pipeline.models.roles import DepthEstimator, register_backend
from grand_pipeline.models.vision_common import check_images, family_tiny_builder, runtime, to_device

logger = logging.getLogger(__name__)

EPS = 1e-6
#: model_type -> what ``predicted_depth`` is when the config does not say.
CONVENTIONS = {"dpt": "inverse", "depth_anything": "inverse", "zoedepth": "metric", "glpn": "metric"}


def _tiny_dpt() -> tuple[Any, Any]:
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        image_size=64, patch_size=16, backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5],
    )  # fmt: skip
    # Square input as Intel/dpt-large's processor: the plain-ViT DPT neck reshapes tokens to a square.
    processor = DPTImageProcessor(size={"height": 64, "width": 64}, keep_aspect_ratio=False)
    return DPTForDepthEstimation(config), processor


def _tiny_depth_anything() -> tuple[Any, Any]:
    from transformers import AutoModelForDepthEstimation, DepthAnythingConfig, Dinov2Config, DPTImageProcessor

    # A dict: out_indices is a runtime kwarg of the backbone configs that their type stubs lack.
    backbone: dict[str, Any] = {
        "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "mlp_ratio": 2,
        "image_size": 56, "patch_size": 14, "out_indices": [1, 2, 3, 4], "reshape_hidden_states": False,
    }  # fmt: skip
    config = DepthAnythingConfig(
        backbone_config=Dinov2Config(**backbone), patch_size=14, reassemble_hidden_size=32,
        neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, head_hidden_size=8,
    )  # fmt: skip
    processor = DPTImageProcessor(
        size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    )  # fmt: skip
    return AutoModelForDepthEstimation.from_config(config), processor


#: family -> builder of (random model, image processor) for ``tiny:<seed>``.
TINY_FAMILIES: dict[str, Callable[[], tuple[Any, Any]]] = {
    "dpt": _tiny_dpt,
    "depth_anything": _tiny_depth_anything,
}


def tiny_builder(family: str) -> Callable[[Path, int], None]:
    return family_tiny_builder("hf_depth", TINY_FAMILIES, family)


def load_depth_model(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """(model, image processor) from a local folder; never touches the network."""
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    return load_pretrained(AutoModelForDepthEstimation, AutoImageProcessor, path, dtype)


def output_convention(config: Any) -> str:
    if getattr(config, "depth_estimation_type", None) == "metric":
        return "metric"
    model_type = str(getattr(config, "model_type", ""))
    if model_type not in CONVENTIONS:
        raise ValueError(
            f"hf_depth: unknown depth output convention for model_type {model_type!r}; "
            "set options.output to inverse or metric"
        )
    return CONVENTIONS[model_type]


@dataclass(frozen=True)
class HFDepthOptions:
    family: str = "dpt"
    """dpt | depth_anything: which tiny model ``tiny:`` builds."""
    output: Literal["inverse", "metric"] | None = None
    """The model's output convention; None reads it from the model config."""


@register_backend("depth", "hf_depth", options=HFDepthOptions)
class HFDepth(DepthEstimator):
    """Relative inverse depth per image, float32 (H, W).

    Options: :class:`HFDepthOptions`. ``spec.batch_size`` images per pass.
    """

    def __init__(self, spec: Any, hub: Any = None) -> None:
        super().__init__(spec, hub)
        opts: HFDepthOptions = self.opts
        family = opts.family
        builder = tiny_builder(family)
        resolved = load_folder(spec, f"hf_depth-{family}", builder)
        self.device, self.dtype = runtime(spec)
        self.model, self.processor = shared_pretrained(
            self.hub, "depth", resolved.path, self.device, self.dtype, load_depth_model
        )
        self.output = opts.output or output_convention(self.model.config)
        if self.output not in ("inverse", "metric"):
            raise ValueError(f"hf_depth: options.output must be inverse or metric, not {self.output!r}")
        self.batch_size = max(1, int(getattr(spec, "batch_size", 8)))
        self.weights_id = resolved.sha256
        is_tiny = resolved.source.startswith("tiny:")
        self.model_id = f"{family}-random({resolved.source})" if is_tiny else str(spec.model)

    def _predict(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model(pixel_values=to_device(pixels, self.device, self.dtype))
        return out.predicted_depth.float()  # (B, h, w)

    def depth(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Per image: float32 (H, W), larger = nearer, at the image's own size."""
        images = check_images(images, "hf_depth")
        pixels = [self.processor(images=img, return_tensors="pt")["pixel_values"][0] for img in images]
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, p in enumerate(pixels):
            groups[tuple(p.shape)].append(i)
        out: list[np.ndarray | None] = [None] * len(images)
        for members in groups.values():
            for lo in range(0, len(members), self.batch_size):
                chunk = members[lo : lo + self.batch_size]
                pred = self._predict(torch.stack([pixels[i] for i in chunk]))
                for row, i in zip(pred, chunk, strict=True):
                    size = images[i].shape[:2]
                    d = F.interpolate(row[None, None], size=size, mode="bicubic", align_corners=False)[0, 0]
                    if self.output == "metric":
                        d = 1.0 / d.clamp(min=EPS)
                    out[i] = d.cpu().numpy().astype(np.float32)
        return [d for d in out if d is not None]
