"""``grand make-sample``: an SA-1B-format shard built from real photographs.

The photographs ship with scikit-image. SA-1B's class-agnostic masks are imitated with the
profile's segmenter in "everything" mode (a grid of box prompts, deduplicated by mask IoU),
because the lite segmenter only takes box prompts.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from grand_pipeline.config import GrandConfig
from grand_pipeline.models.everything import generate_masks
from grand_pipeline.models.hub import ModelHub
from grand_pipeline.sources.sa1b import write_sa1b_tar

logger = logging.getLogger(__name__)


#: The scikit-image photographs of the sample, in order (image ids sa_1 .. sa_6).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "stereo_motorcycle", "hubble_deep_field")


def load_photo(name: str) -> np.ndarray:
    from skimage import data

    image = getattr(data, name)()
    # stereo_motorcycle returns (left, right, disparity); the left view is the photograph.
    return image[0] if isinstance(image, tuple) else image


def _as_rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def photo_names(count: int, start: int = 1) -> list[str]:
    """``count`` photos from position ``start`` (1-based), cycling through PHOTOS."""
    if not 1 <= count <= len(PHOTOS):
        raise ValueError(f"--images must be within 1..{len(PHOTOS)}")
    return [PHOTOS[(start - 1 + i) % len(PHOTOS)] for i in range(count)]


def make_sample(
    output_dir: str,
    cfg: GrandConfig,
    images: int = 6,
    shard_id: str = "sa_000000",
    progress: Callable[[], None] | None = None,
    start: int = 1,
) -> str:
    """Write ``{output_dir}/{shard_id}.tar``; image ids are ``sa_{start}`` .. in PHOTOS order."""
    segmenter = ModelHub(cfg.models, cfg.plugins).get("segmenter")
    items = []
    for index, name in enumerate(photo_names(images, start), start=start):
        rgb = _as_rgb(load_photo(name))
        # Masks are made on the decoded JPEG, which is what the pipeline will see.
        encoded = _jpeg(rgb)
        decoded = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
        annotations = generate_masks(segmenter, decoded)
        height, width = decoded.shape[:2]
        stem = f"sa_{index}"
        record = {
            "image": {"image_id": index, "width": width, "height": height, "file_name": f"{stem}.jpg"},
            "annotations": annotations,
            "source": {"photo": f"skimage.data.{name}", "masks": f"everything-mode {segmenter.model_id}"},
        }
        items.append((stem, encoded, record))
        logger.info("sample %s (%s): %d masks", stem, name, len(annotations))
        if progress:
            progress()
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    path = str(Path(output_dir) / f"{shard_id}.tar")
    write_sa1b_tar(path, items)
    return path
