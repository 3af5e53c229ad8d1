"""Model roles: the interfaces level logic is written against, and their output types.

Every backend implements one role, is registered under a name in ``BACKENDS[role]`` and is built
from a ``ModelSpec`` (see ``grand_pipeline.config``). Each instance carries ``backend`` (the
registry name) and ``model_id`` (weights identity) so that every output can say who produced it.
A backend that stands in for a missing model sets ``heuristic = True``; the levels copy that flag
into row provenance.

Image convention everywhere: ``np.ndarray`` uint8, shape (H, W, 3), RGB.
Box convention: float xyxy in pixels of the original image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from grand_pipeline.registry import Registry

ROLES = (
    "tagger",
    "detector",
    "region_captioner",
    "depth",
    "segmenter",
    "captioner",
    "phrase_extractor",
    "grounder",
    "landmark_classifier",
    "label_assigner",
    "text_embedder",
    "llm",
)

#: One registry per role: ``BACKENDS["detector"].get("nanodet_onnx")`` -> backend class.
BACKENDS: dict[str, Registry[type[Backend]]] = {role: Registry(f"{role} backend") for role in ROLES}


def register_backend(role: str, name: str):
    """Class decorator: register a backend class for ``role`` under ``name``."""
    if role not in BACKENDS:
        raise KeyError(f"unknown role {role!r}; known: {', '.join(ROLES)}")

    def decorator(cls: type[Backend]) -> type[Backend]:
        cls.role = role
        cls.backend = name
        return BACKENDS[role].register(name)(cls)

    return decorator


class Backend:
    """Base of every backend. Subclasses load their weights once, in ``__init__``."""

    role: ClassVar[str] = ""
    backend: ClassVar[str] = ""
    heuristic: ClassVar[bool] = False

    def __init__(self, spec: Any, hub: Any = None) -> None:
        self.spec = spec
        #: The actor's ``ModelHub``; a backend that reuses another role's model asks it.
        self.hub = hub
        self.model_id: str = getattr(spec, "model", "") or self.backend
        #: sha256 of the weights file, or a revision; recorded in run.json and row provenance.
        self.weights_id: str = ""

    def describe(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "backend": self.backend,
            "model_id": self.model_id,
            "weights": self.weights_id,
            "heuristic": self.heuristic,
        }


@dataclass
class Detections:
    """Boxes from one detector on one image.

    boxes: (N, 4) float32 xyxy; scores: (N,) float32; labels: N strings.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: list[str]
    model: str = ""

    @staticmethod
    def empty(model: str = "") -> Detections:
        return Detections(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), [], model)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: np.ndarray) -> Detections:
        idx = np.asarray(idx, dtype=np.int64)
        return Detections(self.boxes[idx], self.scores[idx], [self.labels[i] for i in idx], self.model)


@dataclass
class Tag:
    name: str
    score: float


@dataclass
class Region:
    """A class-agnostic region proposal, e.g. one SA-1B mask. bbox is xyxy; rle is COCO RLE."""

    bbox: np.ndarray
    rle: dict
    score: float = 1.0
    extra: dict = field(default_factory=dict)


class Tagger(Backend):
    def tag(self, images: list[np.ndarray]) -> list[list[Tag]]:
        """Image-level tags, best first, for a micro-batch of images."""
        raise NotImplementedError

    def classify_crops(self, crops: list[np.ndarray], top_k: int = 1) -> list[list[Tag]]:
        """Top-k class names for each crop (used by the region tagger and attributes)."""
        raise NotImplementedError


class Detector(Backend):
    def detect(
        self, images: list[np.ndarray], context: list[dict[str, Any]] | None = None
    ) -> list[Detections]:
        """Detections per image. ``context[i]`` may hold ``tags`` and ``regions`` of image i."""
        raise NotImplementedError


class Segmenter(Backend):
    def segment(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Box prompts -> masks. boxes (N, 4) xyxy; returns bool (N, H, W). One image embedding."""
        raise NotImplementedError


class DepthEstimator(Backend):
    def depth(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Relative inverse depth per image, float32 (H, W): larger means nearer (MiDaS-like)."""
        raise NotImplementedError


class RegionCaptioner(Backend):
    def describe_regions(
        self, image: np.ndarray, boxes: np.ndarray, masks: np.ndarray | None
    ) -> list[str]:
        """A short attribute phrase per box ("red cup"); masks (N, H, W) bool may be None."""
        raise NotImplementedError


class TextEmbedder(Backend):
    def embed(self, texts: list[str]) -> np.ndarray:
        """L2-normalised sentence embeddings, float32 (N, D)."""
        raise NotImplementedError


# ----------------------------------------------------------------------------- text roles (levels 2-4)


@dataclass
class ChatPrompt:
    """A chat-formatted prompt; ``prefix_key`` names a shared in-context prefix (batching, caching)."""

    messages: list[dict[str, str]]
    max_new_tokens: int = 256
    prefix_key: str = ""


@dataclass
class Generation:
    """One LLM answer. ``finish_reason`` is ``stop``, ``length`` or ``error`` (then ``error`` says why)."""

    text: str
    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class LLM(Backend):
    context_length: int = 2048

    def count_tokens(self, prompt: ChatPrompt) -> int:
        raise NotImplementedError

    def generate(
        self, prompts: list[ChatPrompt], *, temperature: float = 0.0, seed: int = 0
    ) -> list[Generation]:
        """One Generation per prompt, in order. A prompt whose tokens plus ``max_new_tokens``
        exceed ``context_length`` gets an ``error`` Generation without running; the rest still run."""
        raise NotImplementedError


class Captioner(Backend):
    def caption(self, images: list[np.ndarray], context: list[dict[str, Any]]) -> list[list[str]]:
        """Short captions per image; ``context[i]`` has ``tags`` and ``objects`` (label strings)."""
        raise NotImplementedError


@dataclass
class Phrase:
    """``text == source[start:end]``; ``root`` is the head noun's lemma."""

    text: str
    start: int
    end: int
    root: str


class PhraseExtractor(Backend):
    def phrases(self, texts: list[str]) -> list[list[Phrase]]:
        raise NotImplementedError

    def nouns(self, text: str) -> list[Phrase]:
        """Single noun tokens, for the noun fallback of caption grounding."""
        raise NotImplementedError


@dataclass
class Grounding:
    phrase: str
    box: np.ndarray
    score: float


class Grounder(Backend):
    def ground(
        self, image: np.ndarray | None, phrases: list[str], objects: list[dict[str, Any]]
    ) -> list[Grounding | None]:
        """One grounding (or None) per phrase; ``objects`` are the image's object dicts."""
        raise NotImplementedError


class LandmarkClassifier(Backend):
    def classify(
        self, images: list[np.ndarray | None], texts: list[str]
    ) -> list[tuple[str, str, float]]:
        """(category, fine_category, score) per image over ``grand_pipeline.taxonomy``."""
        raise NotImplementedError


class LabelAssigner(Backend):
    def assign(
        self, image: np.ndarray | None, boxes: np.ndarray, candidates: list[list[str]], context: str
    ) -> list[str]:
        """One label per box, chosen among that box's candidates."""
        raise NotImplementedError
