"""NanoDet-m (COCO-80) as an ONNX detector: the lite profile's closed-vocabulary ensemble member.

The committed ``assets/nanodet-m-416.onnx`` takes one BGR, mean/std-normalised NCHW image of
416x416 and returns, for each stride s in (8, 16, 32), a sigmoid score tensor ``[1, N, 80]`` and a
GFL box-distribution tensor ``[1, N, 44]`` with N = (416 / s)^2. Output names are conversion
artefacts, so the outputs are matched by shape (see ``shared/models/README.md``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from grand_pipeline.config import check_ranges
from grand_pipeline.geometry.boxes import nms
from grand_pipeline.models import weights
from grand_pipeline.models.roles import Detections, Detector, register_backend

logger = logging.getLogger(__name__)

INPUT_NAME = "input_1:0"
NUM_CLASSES = 80
REG_BINS = 11  # GFL reg_max = 10 -> 11 bins per side
STRIDES = (8, 16, 32)
# BGR order, as the model was trained (NanoDet uses OpenCV images).
MEAN_BGR = np.array([103.53, 116.28, 123.675], np.float32)
STD_BGR = np.array([57.375, 57.12, 58.395], np.float32)
LABELS_FILE = "coco80_labels.json"
TINY_MODEL_FILE = "model.onnx"


def _asset(name: str) -> Path:
    return Path(str(resources.files("grand_pipeline") / "assets" / name))


def _packaged_model() -> Path:
    return _asset("nanodet-m-416.onnx")


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def gfl_decode(box_dist: np.ndarray, stride: int, size: int) -> np.ndarray:
    """GFL distribution -> boxes in input pixels.

    box_dist: (N, 44) logits, N = (size / stride)^2 cells in row-major order.
    Returns (N, 4) float32 xyxy in the ``size`` x ``size`` input frame.
    """
    n = box_dist.shape[0]
    width = size // stride
    probs = _softmax(box_dist.reshape(n, 4, REG_BINS).astype(np.float32), axis=2)
    # Expectation over bin indices 0..10 gives (left, top, right, bottom) in stride units.
    dist = probs @ np.arange(REG_BINS, dtype=np.float32) * stride  # (N, 4)
    idx = np.arange(n)
    cx = ((idx % width) + 0.5) * stride
    cy = ((idx // width) + 0.5) * stride
    return np.stack([cx - dist[:, 0], cy - dist[:, 1], cx + dist[:, 2], cy + dist[:, 3]], axis=1).astype(
        np.float32
    )


@dataclass(frozen=True)
class NanoDetOptions:
    """``score_threshold`` is the model's own candidate floor, applied per class before its
    class-wise NMS and ``pre_nms_top_k``: it bounds that NMS's work and sets the lowest score any
    NanoDet box can have. It is not the ensemble's pre-filter (``level1.score_thresholds``), which
    is cut later and, for persons of ``level1.person.promote`` members, may go down to
    ``level1.person.floor``; such a person still needs this floor first."""

    score_threshold: float = 0.35
    nms_iou: float = 0.5
    """Class-wise NMS inside the model (the ensemble's class-agnostic NMS is ``level1.nms_iou``)."""
    max_detections: int = 100
    pre_nms_top_k: int = 1000
    """Bounds the O(K^2) NMS when the threshold is low (e.g. 0.0 on the tiny model)."""
    input_size: int | None = None
    """Input side for dynamic exports (None: 416); a static graph's size wins over it."""
    threads: int = 0
    """onnxruntime intra-op threads; 0 is its default."""

    def validate(self) -> None:
        check_ranges(
            self,
            unit=("score_threshold", "nms_iou"),
            at_least_one=("max_detections", "pre_nms_top_k", "input_size"),
            non_negative=("threads",),
        )


@register_backend("detector", "nanodet_onnx", options=NanoDetOptions)
class NanoDetONNX(Detector):
    """COCO-80 detector; one onnxruntime session per instance, loaded once.

    Options: :class:`NanoDetOptions`.
    """

    def __init__(self, spec: Any, hub: Any = None) -> None:
        super().__init__(spec, hub)
        import onnxruntime as ort  # lite extra; imported here so the package imports without it

        # No usage events from our sessions. (The import itself still creates onnxruntime's device
        # id under $XDG_CACHE_HOME or ~/.cache: see README, "Files outside the output".)
        ort.disable_telemetry_events()

        opts: NanoDetOptions = self.opts
        self.score_threshold = opts.score_threshold
        self.nms_iou = opts.nms_iou
        self.max_detections = opts.max_detections
        self.pre_nms_top_k = opts.pre_nms_top_k

        resolved = weights.resolve(
            getattr(spec, "model", ""),
            name="nanodet_onnx",
            package_default=_packaged_model,
            tiny_builder=build_tiny_nanodet,
        )
        model_path = resolved.path / TINY_MODEL_FILE if resolved.path.is_dir() else resolved.path
        labels_path = model_path.parent / LABELS_FILE
        if not labels_path.exists():
            labels_path = _asset(LABELS_FILE)
        self.labels: list[str] = json.loads(labels_path.read_text())
        self.weights_id = resolved.sha256
        if resolved.source.startswith("tiny:"):
            self.model_id = "nanodet-tiny-random"
        elif resolved.source.startswith("package:"):
            self.model_id = "nanodet-m-416"
        else:
            self.model_id = model_path.stem  # a user's export; its sha256 is the real identity

        so = ort.SessionOptions()
        so.intra_op_num_threads = opts.threads
        self.session = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        # A symbolic (str/None) batch dim lets a micro-batch go through in one run; the committed
        # model has a fixed batch of 1, so it is looped.
        self.batchable = not isinstance(inp.shape[0], int)
        # A static spatial size in the graph wins over the option, which only serves dynamic exports.
        static = inp.shape[2] if isinstance(inp.shape[2], int) else None
        self.input_size = int(static or opts.input_size or 416)
        if static and opts.input_size is not None and opts.input_size != static:
            logger.warning("nanodet_onnx: input_size option ignored; the graph is fixed at %d", static)
        self._heads = self._match_heads()
        if len(self.labels) != NUM_CLASSES:
            raise ValueError(f"nanodet_onnx: expected {NUM_CLASSES} labels, got {len(self.labels)}")
        logger.info("nanodet_onnx: %s (%s), batchable=%s", self.model_id, model_path, self.batchable)

    def _match_heads(self) -> list[tuple[int, int, int]]:
        """(stride, score output index, box output index) per level, matched by shape."""
        scores: dict[int, int] = {}
        boxes: dict[int, int] = {}
        for i, out in enumerate(self.session.get_outputs()):
            n, channels = out.shape[1], out.shape[2]
            if channels == NUM_CLASSES:
                scores[n] = i
            elif channels == 4 * REG_BINS:
                boxes[n] = i
        heads = []
        for n, score_idx in scores.items():
            stride = int(round(self.input_size / np.sqrt(n)))
            if n not in boxes or (self.input_size // stride) ** 2 != n:
                raise ValueError(f"nanodet_onnx: cannot pair outputs for N={n} at input {self.input_size}")
            heads.append((stride, score_idx, boxes[n]))
        if not heads:
            raise ValueError("nanodet_onnx: no [1,N,80] score outputs found")
        return sorted(heads)

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """RGB uint8 (H, W, 3) -> float32 (3, S, S) BGR, normalised; plain resize (no letterbox)."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"nanodet_onnx: expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}"
            )
        size = self.input_size
        resized = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR), np.float32)
        bgr = resized[:, :, ::-1]
        return np.ascontiguousarray(((bgr - MEAN_BGR) / STD_BGR).transpose(2, 0, 1))

    def detect(
        self, images: list[np.ndarray], context: list[dict[str, Any]] | None = None
    ) -> list[Detections]:
        """Detections per image; boxes (N, 4) float32 xyxy in original pixels, COCO labels."""
        if not images:
            return []
        batch = np.stack([self.preprocess(img) for img in images])  # (B, 3, S, S)
        if self.batchable:
            outs = self.session.run(None, {self.input_name: batch})
            per_image = [[o[b] for o in outs] for b in range(len(images))]
        else:
            per_image = [
                [o[0] for o in self.session.run(None, {self.input_name: batch[b : b + 1]})]
                for b in range(len(images))
            ]
        return [
            self._postprocess(outs, img.shape[0], img.shape[1])
            for outs, img in zip(per_image, images, strict=True)
        ]

    def _postprocess(self, outs: list[np.ndarray], height: int, width: int) -> Detections:
        """outs: per-output arrays without the batch dim -> thresholded, NMS'd, rescaled boxes."""
        all_boxes = []
        all_scores = []
        for stride, score_idx, box_idx in self._heads:
            all_boxes.append(gfl_decode(outs[box_idx], stride, self.input_size))
            all_scores.append(outs[score_idx])
        boxes = np.concatenate(all_boxes)  # (C, 4) cells
        scores = np.concatenate(all_scores).astype(np.float32)  # (C, 80)
        # Multi-label candidates as in NanoDet's post-processing: every (cell, class) above threshold.
        cell, cls = np.nonzero(scores >= self.score_threshold)
        if cell.size == 0:
            return Detections.empty("nanodet")
        cand_scores = scores[cell, cls]
        if cand_scores.size > self.pre_nms_top_k:
            top = np.argpartition(-cand_scores, self.pre_nms_top_k - 1)[: self.pre_nms_top_k]
            cell, cls, cand_scores = cell[top], cls[top], cand_scores[top]
        cand_boxes = boxes[cell]
        # Class-wise NMS with one call: shift each class into its own disjoint coordinate range.
        offset = cls[:, None].astype(np.float64) * (4.0 * self.input_size)
        keep = nms(cand_boxes + offset, cand_scores, self.nms_iou)[: self.max_detections]
        out = cand_boxes[keep] * np.array([width / self.input_size, height / self.input_size] * 2, np.float32)
        out[:, 0::2] = np.clip(out[:, 0::2], 0.0, float(width))
        out[:, 1::2] = np.clip(out[:, 1::2], 0.0, float(height))
        return Detections(
            boxes=out.astype(np.float32),
            scores=cand_scores[keep].astype(np.float32),
            labels=[self.labels[int(c)] for c in cls[keep]],
            model="nanodet",
        )


def build_tiny_nanodet(folder: Path, seed: int) -> None:
    """Write ``folder/model.onnx``: random weights, same interface as the real NanoDet ONNX.

    Input ``input_1:0`` float32 [1, 3, 416, 416]; per stride s in (8, 16, 32) a sigmoid score output
    [1, N, 80] and a box output [1, N, 44], N = (416 / s)^2. A strided conv stem plus per-level
    pooling and 1x1 convs keep the outputs dependent on the input, so the whole decode path runs.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    size = 416
    hidden = 8
    inits = []
    nodes = []

    def weight(name: str, shape: tuple[int, ...], scale: float) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    nodes.append(
        helper.make_node(
            "Conv",
            ["input_1:0", weight("stem_w", (hidden, 3, 8, 8), 0.05), weight("stem_b", (hidden,), 0.1)],
            ["stem"],
            kernel_shape=[8, 8],
            strides=[8, 8],
        )
    )
    nodes.append(helper.make_node("Relu", ["stem"], ["feat8"]))
    outputs = []
    for stride in STRIDES:
        n = (size // stride) ** 2
        feat = f"feat{stride}"
        if stride != 8:
            k = stride // 8
            nodes.append(
                helper.make_node("AveragePool", ["feat8"], [feat], kernel_shape=[k, k], strides=[k, k])
            )
        for kind, channels in (("cls", NUM_CLASSES), ("reg", 4 * REG_BINS)):
            pre = f"{kind}{stride}"
            # Small scales keep the sigmoid scores spread out instead of saturated at 0 or 1.
            w = weight(f"{pre}_w", (channels, hidden, 1, 1), 0.2)
            b = weight(f"{pre}_b", (channels,), 0.5)
            nodes.append(helper.make_node("Conv", [feat, w, b], [f"{pre}_conv"]))
            shape = f"{pre}_shape"
            inits.append(numpy_helper.from_array(np.array([1, channels, n], np.int64), shape))
            nodes.append(helper.make_node("Reshape", [f"{pre}_conv", shape], [f"{pre}_flat"]))
            last = f"{pre}_out" if kind == "reg" else f"{pre}_t"
            nodes.append(helper.make_node("Transpose", [f"{pre}_flat"], [last], perm=[0, 2, 1]))
            if kind == "cls":
                # The real model's scores are already sigmoid-ed.
                nodes.append(helper.make_node("Sigmoid", [last], [f"{pre}_out"]))
            outputs.append(helper.make_tensor_value_info(f"{pre}_out", TensorProto.FLOAT, [1, n, channels]))

    graph = helper.make_graph(
        nodes,
        "nanodet_tiny_random",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, [1, 3, size, size])],
        outputs,
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="grand")
    model.ir_version = 8  # readable by every onnxruntime the lite extra allows
    onnx.checker.check_model(model, full_check=True)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / TINY_MODEL_FILE))
    # Labels travel with the weights so the folder is self-describing (and part of its sha256).
    (folder / LABELS_FILE).write_bytes(_asset(LABELS_FILE).read_bytes())
