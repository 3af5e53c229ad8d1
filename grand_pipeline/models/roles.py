"""Model roles: the interfaces level logic is written against, and their output types.

Every backend implements one role, is registered under a name in ``BACKENDS[role]`` and is built
from a ``ModelSpec`` (see ``grand_pipeline.config``). Its knobs are a typed options dataclass
(``Options``, given to ``register_backend``) built from ``spec.options`` by ``build_options``:
the config is refused at load time for an unknown key, a wrong type or a value out of range, and
the backend reads ``self.opts`` (defaults live in the dataclass, nowhere else). Each instance carries ``backend`` (the
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

from grand_pipeline.config import build
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


@dataclass(frozen=True)
class NoOptions:
    """The options of a backend that takes none: any key under ``options`` is refused."""


def register_backend(role: str, name: str, options: type | None = None):
    """Class decorator: register a backend class for ``role`` under ``name``, with its options
    dataclass (None keeps the class's own ``Options``, inherited or ``NoOptions``)."""
    if role not in BACKENDS:
        raise KeyError(f"unknown role {role!r}; known: {', '.join(ROLES)}")

    def decorator(cls: type[Backend]) -> type[Backend]:
        cls.role = role
        cls.backend = name
        if options is not None:
            cls.Options = options
        return BACKENDS[role].register(name)(cls)

    return decorator


def build_options(cls: type[Backend], raw: dict[str, Any] | None, key: str = "") -> Any:
    """``raw`` (a spec's ``options`` mapping) as ``cls.Options``; a ``ConfigError`` names
    ``key.field`` for an unknown key, a wrong type or a value its ``validate()`` refuses."""
    return build(cls.Options, dict(raw or {}), key or f"{cls.backend}.options")


class Backend:
    """Base of every backend. Subclasses load their weights once, in ``__init__``."""

    role: ClassVar[str] = ""
    backend: ClassVar[str] = ""
    heuristic: ClassVar[bool] = False
    Options: ClassVar[type] = NoOptions

    def __init__(self, spec: Any, hub: Any = None) -> None:
        self.spec = spec
        #: ``spec.options`` as this backend's typed ``Options`` (validated again: cheap, and a
        #: spec built in code rather than loaded from a profile gets the same checks).
        self.opts: Any = build_options(type(self), getattr(spec, "options", None))
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

    def startup_problem(self) -> StartupProblem | None:
        """Why this backend cannot serve, found by one tiny real call at actor start; None when
        it can. Loading the weights in ``__init__`` is the whole check for most backends; the
        ones whose failures would otherwise only show as empty outputs (LLMs) override this."""
        return None


@dataclass(frozen=True)
class StartupProblem:
    """A backend's failed start-up call: ``model`` is ``backend/model_id`` of the model that failed."""

    model: str
    reason: str


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


#: The start-up probe: one tiny generation through the backend's whole path (chat template,
#: tokeniser, engine or server). Without it a model that cannot template or answer shows up only
#: as "generation failed" on every attempt of every row.
PROBE_MESSAGES = (
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "What colour is the sky on a clear day?"},
)
PROBE_MAX_NEW_TOKENS = 4


class LLM(Backend):
    context_length: int = 2048
    chat_template: str = ""
    """Name of the conversation template prompts are rendered with (recorded by ``describe``)."""

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        if self.chat_template:
            info["chat_template"] = self.chat_template
        return info

    def startup_problem(self) -> StartupProblem | None:
        """One greedy generation of a few tokens; an error Generation or an exception is the
        problem. An empty answer is not: a small or random model may well stop at once."""
        probe = ChatPrompt(
            messages=[dict(m) for m in PROBE_MESSAGES],
            max_new_tokens=PROBE_MAX_NEW_TOKENS,
            prefix_key="startup_check",
        )
        try:
            answers = self.generate([probe], temperature=0.0, seed=0)
        except Exception as exc:  # noqa: BLE001 - any failure is the answer to the probe
            reason = f"{type(exc).__name__}: {exc}"
        else:
            if len(answers) != 1:
                reason = f"returned {len(answers)} generations for 1 prompt"
            elif answers[0].finish_reason == "error":
                reason = answers[0].error or "unknown error"
            else:
                return None
        return StartupProblem(model=f"{self.backend}/{self.model_id}", reason=reason)

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
