"""Ultralytics detectors: YOLO11 / RT-DETR (closed set) and YOLO-World (open vocabulary).

Weights format. An official ``.pt`` checkpoint is a pickled model object: ultralytics' own loader
(``torch_safe_load``) calls ``torch.load(weights_only=False)``, which runs arbitrary code from the
file. So the production loader reads a folder instead: ``model.yaml`` (the architecture, with
``names``) plus ``weights.pt`` (a plain state dict, read with ``weights_only=True``) into a model
built from the yaml. ``export_checkpoint(pt, folder)`` converts an official checkpoint once, on a
machine where that file is trusted; pointing ``model`` at a ``.pt`` file works only with
``options.trust_pickle: true``, which says so in the log.

Family (``yolo`` | ``rtdetr`` | ``yoloworld``) is read from the yaml's head (RTDETRDecoder,
WorldDetect, else Detect); option ``family`` only picks what ``tiny:<seed>`` builds (default yolo).

YOLO-World classes. ``WorldModel.set_classes`` would build OpenAI CLIP ViT-B/32 with the ``clip``
package, which downloads its weights. Here the class embeddings come from a transformers CLIP text
tower in a local folder instead: ``options.text_model`` (any weights source, e.g. a copy of
``openai/clip-vit-base-patch32``, the model YOLO-World was trained with), default the weights
folder's ``text_model/``. Embeddings are L2-normalised like ultralytics' ``CLIP.encode_text`` and
cached per name. A micro-batch is queried with the union of its images' tags (one forward pass);
each image keeps only boxes of its own tags.

Nothing downloads: ``YOLO_OFFLINE`` is set before ultralytics is imported.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from grand_pipeline.config import check_ranges
from grand_pipeline.models import weights
from grand_pipeline.models.hf_common import save_pretrained
from grand_pipeline.models.roles import Detections, Detector, register_backend
from grand_pipeline.models.vision_common import (
    detect_in_batches,
    fallback_queries,
    runtime,
    seeded_build,
    to_device,
)

logger = logging.getLogger(__name__)

YAML_FILE, STATE_FILE, TEXT_DIR = "model.yaml", "weights.pt", "text_model"
#: family -> (ultralytics yaml the tiny variant is built from, scale, model class name)
FAMILIES = {
    "yolo": ("yolo11n.yaml", "n", "DetectionModel"),
    "rtdetr": ("rtdetr-l.yaml", "n", "RTDETRDetectionModel"),
    "yoloworld": ("yolov8s-worldv2.yaml", "n", "WorldModel"),
}
HEADS = {"RTDETRDecoder": "rtdetr", "WorldDetect": "yoloworld"}
PAD_VALUE = 114.0  # ultralytics' letterbox grey


def _tasks() -> Any:
    os.environ.setdefault("YOLO_OFFLINE", "1")  # no hub/asset/update checks from ultralytics
    import PIL.Image
    import torch

    # Importing ultralytics replaces PIL.Image.open and torch.save process-wide. Its Image.open
    # answers an unreadable file by trying to pip-install a HEIF plugin and then raises
    # ModuleNotFoundError, so a corrupt JPEG in any other stage of this actor would stop being a
    # decode error row. Put both back: our backend needs neither patch.
    saved = PIL.Image.open, torch.save
    try:
        from ultralytics.nn import tasks
    finally:
        PIL.Image.open, torch.save = saved
    return tasks


def family_of(cfg: dict[str, Any]) -> str:
    return HEADS.get(str(cfg["head"][-1][2]), "yolo")


def build_model(cfg: dict[str, Any]) -> Any:
    cls = getattr(_tasks(), FAMILIES[family_of(cfg)][2])
    model = cls(dict(cfg), nc=int(cfg["nc"]), verbose=False)
    model.names = {i: str(n) for i, n in enumerate(cfg.get("names") or range(int(cfg["nc"])))}
    return model.eval()


def _save(folder: Path, cfg: dict[str, Any], model: torch.nn.Module) -> None:
    (folder / YAML_FILE).write_text(yaml.safe_dump(cfg, sort_keys=False))
    torch.save(
        {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()},
        folder / STATE_FILE,
    )


def export_checkpoint(pt_file: Path, folder: Path) -> None:
    """Official ``.pt`` -> ``model.yaml`` + ``weights.pt``. Unpickles the file: trusted files only."""
    model = _tasks().load_checkpoint(str(pt_file), device="cpu")[0]
    cfg = dict(model.yaml)
    cfg["names"] = [model.names[i] for i in sorted(model.names)]
    folder.mkdir(parents=True, exist_ok=True)
    _save(folder, cfg, model)


def tiny_builder(family: str) -> Any:
    if family not in FAMILIES:
        raise ValueError(f"ultralytics: unknown family {family!r}; known: {', '.join(FAMILIES)}")

    def build(folder: Path, seed: int) -> None:
        source, scale, _ = FAMILIES[family]
        cfg = {k: v for k, v in _tasks().yaml_model_load(source).items() if k != "yaml_file"}
        names = fallback_queries()
        cfg.update(scale=scale, nc=len(names), names=list(names))
        # A small width/depth so the random model runs in a second on a CPU; the layer graph is
        # the real one (RT-DETR has a single published scale, so one is added for it).
        cfg["scales"] = {scale: [0.33, 0.25, 256]}
        _save(folder, cfg, seeded_build(seed, lambda: build_model(cfg)))
        if family == "yoloworld":
            from grand_pipeline.models.backends.clip_tagger import tiny_clip

            # The text tower's projection must match WorldDetect's embedding size (512 for ViT-B/32).
            embed = int(cfg["head"][-1][3][1])
            clip, processor = seeded_build(seed, lambda: tiny_clip(projection_dim=embed))
            save_pretrained(folder / TEXT_DIR, clip, processor)

    return build


def load_folder_model(path: Path, trust_pickle: bool) -> tuple[Any, dict[str, Any]]:
    """(model, architecture dict) from a converted folder, or from a trusted pickled ``.pt``."""
    if path.is_dir() and not (path / YAML_FILE).exists():
        found = ", ".join(sorted(p.name for p in path.glob("*.pt"))) or "none"
        raise weights.ModelSourceError(
            f"ultralytics: {path} has no {YAML_FILE} (.pt files: {found}); convert a checkpoint with "
            "ultralytics_detector.export_checkpoint, or name one with options.checkpoint"
        )
    if path.is_file():
        if not trust_pickle:
            raise weights.ModelSourceError(
                f"ultralytics: {path} is a pickled checkpoint; convert it once with "
                "ultralytics_detector.export_checkpoint or set options.trust_pickle: true"
            )
        logger.warning("ultralytics: unpickling %s (torch.load weights_only=False)", path)
        model = _tasks().load_checkpoint(str(path), device="cpu")[0].float().eval()
        return model, dict(model.yaml)
    cfg = yaml.safe_load((path / YAML_FILE).read_text())
    model = build_model(cfg)
    model.load_state_dict(torch.load(path / STATE_FILE, map_location="cpu", weights_only=True), strict=True)
    return model, cfg


@dataclass(frozen=True)
class UltralyticsOptions:
    """Boxes under ``score_threshold`` never leave the model: a candidate floor applied with the
    model's own post-processing (before ``max_detections``), not the ensemble's pre-filter
    ``level1.score_thresholds``, which is cut later on what comes out."""

    family: str = "yolo"
    """yolo | rtdetr | yoloworld: the architecture of ``tiny:`` builds."""
    checkpoint: str | None = None
    """A file inside the weights folder, e.g. ``yolo11x.pt`` of a hub snapshot."""
    trust_pickle: bool = False
    """Load a pickled ``.pt`` (only for files you trust; says so in the log)."""
    score_threshold: float = 0.25
    nms_iou: float = 0.7
    """The model's own NMS (the ensemble's class-agnostic NMS is ``level1.nms_iou``)."""
    imgsz: int | None = None
    """Input side; None: 640 (tiny builds: 320, RT-DETR 160)."""
    max_detections: int = 300
    max_queries: int = 32
    """YOLO-World: tags used as classes per image, best first."""
    text_model: str | None = None
    """YOLO-World's CLIP text tower (any weights source); None: ``text_model/`` next to the weights."""

    def validate(self) -> None:
        check_ranges(
            self,
            unit=("score_threshold", "nms_iou"),
            at_least_one=("imgsz", "max_detections", "max_queries"),
        )


@register_backend("detector", "ultralytics", options=UltralyticsOptions)
class UltralyticsDetector(Detector):
    """Closed-set YOLO / RT-DETR or open-vocabulary YOLO-World. Options: :class:`UltralyticsOptions`."""

    def __init__(self, spec: Any, hub: Any = None) -> None:
        super().__init__(spec, hub)
        opts: UltralyticsOptions = self.opts
        requested = opts.family
        resolved = weights.resolve(
            str(spec.model or ""), name=f"ultralytics-{requested}", tiny_builder=tiny_builder(requested)
        )
        is_tiny = resolved.source.startswith("tiny:")
        self.device, self.dtype = runtime(spec)
        path = resolved.path / opts.checkpoint if opts.checkpoint else resolved.path
        model, cfg = load_folder_model(path, opts.trust_pickle)
        self.family = family_of(cfg)
        # Conv+BN fusion, as ultralytics' own predictor does before inference.
        self.model = model.fuse(verbose=False).to(self.device, self.dtype)
        self.names = [str(model.names[i]) for i in sorted(model.names)]
        self.score_threshold = opts.score_threshold
        self.nms_iou = opts.nms_iou
        # RT-DETR's decoder is heavy on a CPU even at tiny width, hence its smaller tiny input.
        tiny_size = 160 if self.family == "rtdetr" else 320
        self.imgsz = opts.imgsz or (tiny_size if is_tiny else 640)
        self.max_detections = opts.max_detections
        self.max_queries = opts.max_queries
        self.batch_size = max(1, int(getattr(spec, "batch_size", 8)))
        self._text: Any = None
        self._emb: dict[str, torch.Tensor] = {}
        if self.family == "yoloworld":
            args = cfg["head"][-1][3]  # WorldDetect args: [nc, embed dim, with_bn]
            embed = int(args[1]) if len(args) > 1 else 512
            self._text = self._load_text_model(str(opts.text_model or resolved.path / TEXT_DIR), embed)
        self.weights_id = resolved.sha256
        self.model_id = f"{self.family}-random({resolved.source})" if is_tiny else str(spec.model)

    def _load_text_model(self, source: str, expected: int) -> tuple[Any, Any, Any]:
        from grand_pipeline.models.backends.clip_tagger import features, load_clip

        try:
            folder = weights.resolve(source, name="yoloworld text model").path
        except weights.ModelSourceError as exc:
            raise weights.ModelSourceError(
                f"{exc}. YOLO-World needs a CLIP text tower (openai/clip-vit-base-patch32) as "
                "options.text_model, or a text_model/ folder next to its weights"
            ) from None
        # fp32: it runs once per new class name, and its embeddings are cached.
        model, processor = load_clip(folder, torch.float32)
        dim = int(model.config.projection_dim)
        if dim != expected:
            raise ValueError(f"ultralytics: text model embeds in {dim} dims, YOLO-World expects {expected}")
        return model.to(self.device), processor, features

    def _text_embeddings(self, names: list[str]) -> torch.Tensor:
        """(1, len(names), D) L2-normalised CLIP text embeddings, computed once per name."""
        model, processor, features = self._text
        missing = [n for n in names if n not in self._emb]
        if missing:
            tokens = processor.tokenizer(missing, padding=True, truncation=True, return_tensors="pt")
            with torch.inference_mode():
                emb = features(model.get_text_features(**{k: v.to(self.device) for k, v in tokens.items()}))
            self._emb.update(zip(missing, F.normalize(emb.float(), dim=-1), strict=True))
        return torch.stack([self._emb[n] for n in names])[None]

    def _letterbox(self, images: list[np.ndarray]) -> tuple[torch.Tensor, list[tuple[float, float, float]]]:
        """uint8 images -> (B, 3, S, S) in [0, 1] plus (ratio, pad_x, pad_y) per image.

        RT-DETR was trained on a plain square resize, YOLO on a centred letterbox.
        """
        size, batch, frames = self.imgsz, [], []
        for img in images:
            h, w = img.shape[:2]
            x = to_device(torch.from_numpy(img).permute(2, 0, 1)[None], self.device).float()
            if self.family == "rtdetr":
                batch.append(F.interpolate(x, (size, size), mode="bilinear", align_corners=False))
                frames.append((0.0, 0.0, 0.0))
                continue
            r = min(size / h, size / w)
            nh, nw = round(h * r), round(w * r)
            x = F.interpolate(x, (nh, nw), mode="bilinear", align_corners=False)
            px, py = (size - nw) / 2, (size - nh) / 2
            pad = (
                int(round(px - 0.1)),
                size - nw - int(round(px - 0.1)),
                int(round(py - 0.1)),
                size - nh - int(round(py - 0.1)),
            )
            batch.append(F.pad(x, pad, value=PAD_VALUE))
            frames.append((r, float(pad[0]), float(pad[2])))
        return (torch.cat(batch) / 255.0).to(self.dtype), frames

    def detect(
        self, images: list[np.ndarray], context: list[dict[str, Any]] | None = None
    ) -> list[Detections]:
        return detect_in_batches(
            "ultralytics", images, context, self.max_queries, self.batch_size, self._detect
        )

    def _detect(self, images: list[np.ndarray], queries: list[list[str]]) -> list[Detections]:
        from ultralytics.utils.nms import non_max_suppression

        names = self.names
        if self.family == "yoloworld":
            names = list(dict.fromkeys(q for per in queries for q in per))
            self.model.txt_feats = self._text_embeddings(names).to(self.dtype)
            self.model.model[-1].nc = len(names)
        x, frames = self._letterbox(images)
        with torch.inference_mode():
            pred = self.model(x)
            pred = (pred[0] if isinstance(pred, (tuple, list)) else pred).float()
        results = []
        for b, img in enumerate(images):
            h, w = img.shape[:2]
            if self.family == "rtdetr":
                p = pred[b][pred[b][:, 4] > self.score_threshold][: self.max_detections]
                cx, cy, bw, bh = p[:, 0] * w, p[:, 1] * h, p[:, 2] * w, p[:, 3] * h
                boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
                scores, cls = p[:, 4], p[:, 5].long()
            else:
                p = non_max_suppression(
                    pred[b : b + 1],
                    self.score_threshold,
                    self.nms_iou,
                    max_det=self.max_detections,
                    nc=len(names),
                )[0]
                r, px, py = frames[b]
                boxes = (p[:, :4] - torch.tensor([px, py, px, py], device=p.device)) / r
                scores, cls = p[:, 4], p[:, 5].long()
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            labels = [names[int(c)] for c in cls.cpu()]
            keep = np.array(
                [self.family != "yoloworld" or lab in queries[b] for lab in labels], bool
            ).reshape(-1)
            results.append(
                Detections(
                    boxes.cpu().numpy().astype(np.float32).reshape(-1, 4)[keep],
                    scores.cpu().numpy().astype(np.float32)[keep],
                    [lab for lab, k in zip(labels, keep, strict=True) if k],
                    f"ultralytics-{self.family}",
                )
            )
        return results
