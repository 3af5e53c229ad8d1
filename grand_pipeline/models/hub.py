"""ModelHub: builds each configured backend once per process (once per Ray actor) and caches it,
and holds the model instances its backends share (:meth:`ModelHub.shared`): one BLIP-2 for the
captioner and the region captioner, one CLIP for the tagger and the label assigner. Everything a
hub loaded goes when the hub goes (a released level's runner), nothing stays process-wide.

``validate_models`` is the load-time half: every configured backend name must be registered for
its role and its options must build into the backend's options dataclass, so that a typo fails
as one line naming the dotted key before any model loads or actor starts.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from grand_pipeline.config import ConfigError, GrandConfig, ModelsConfig, ModelSpec
from grand_pipeline.models.roles import BACKENDS, Backend, build_options
from grand_pipeline.models.weights import ModelSourceError

logger = logging.getLogger(__name__)

T = TypeVar("T")


def import_backends(plugins: list[str] | tuple[str, ...] = ()) -> None:
    """Register the built-in backends, then those of plugin modules (decorators run at import)."""
    import grand_pipeline.models.backends  # noqa: F401

    for module in plugins:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ModelSourceError(f"plugin module {module!r} cannot be imported: {exc}") from None


def model_specs(models: ModelsConfig) -> list[tuple[str, str, ModelSpec]]:
    """(hub key, role, spec) of every configured model: ``detectors.owlv2`` is a ``detector``,
    any other field of ``ModelsConfig`` is its own role (so a role added there needs no list)."""
    out = [(f"detectors.{name}", "detector", spec) for name, spec in models.detectors.items()]
    for f in dataclasses.fields(models):
        spec = getattr(models, f.name)
        if f.name != "detectors" and spec is not None:
            out.append((f.name, f.name, spec))
    return out


def validate_models(cfg: GrandConfig) -> None:
    """Refuse, as a ``ConfigError`` naming the dotted key, a plugin that cannot be imported, a
    backend name unknown for its role (listing the known ones) and options its dataclass does
    not accept. Imports the backend modules (no weights load) and nothing else."""
    try:
        import_backends(cfg.plugins)
    except ModelSourceError as exc:
        raise ConfigError(f"plugins: {exc}") from None
    for key, role, spec in model_specs(cfg.models):
        if spec.backend not in BACKENDS[role]:
            known = ", ".join(BACKENDS[role].names())
            raise ConfigError(f"models.{key}.backend: unknown {role} backend {spec.backend!r}; known: {known}")
        build_options(BACKENDS[role].get(spec.backend), spec.options, f"models.{key}.options")


class ModelHub:
    """Resolves ``role`` or ``role.member`` keys of ``ModelsConfig`` to loaded backends."""

    def __init__(self, models: ModelsConfig, plugins: list[str] | tuple[str, ...] = ()) -> None:
        import_backends(plugins)
        self.models = models
        self._cache: dict[str, Backend] = {}
        self._shared: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def spec(self, key: str) -> tuple[str, ModelSpec]:
        """``"tagger"`` or ``"detectors.nanodet"`` -> (role, spec)."""
        head, _, member = key.partition(".")
        if head == "detectors":
            if member not in self.models.detectors:
                known = ", ".join(sorted(self.models.detectors))
                raise KeyError(f"no detector member {member!r}; members: {known}")
            return "detector", self.models.detectors[member]
        spec = getattr(self.models, head, None)
        if spec is None:
            raise KeyError(f"no model configured for {head!r}")
        return head, spec

    def get(self, key: str) -> Backend:
        if key not in self._cache:
            role, spec = self.spec(key)
            cls = BACKENDS[role].get(spec.backend)
            start = time.perf_counter()
            self._cache[key] = cls(spec, hub=self)
            logger.info("loaded %s (%s) in %.1fs", key, spec.backend, time.perf_counter() - start)
        return self._cache[key]

    def shared(self, kind: str, path: Path, factory: Callable[[], T]) -> T:
        """The instance of ``kind`` loaded from ``path`` that this hub's backends share;
        ``factory`` runs once per (kind, resolved path)."""
        key = (kind, str(Path(path).resolve()))
        with self._lock:
            if key not in self._shared:
                self._shared[key] = factory()
            return self._shared[key]

    def loaded(self) -> dict[str, dict[str, Any]]:
        return {key: backend.describe() for key, backend in sorted(self._cache.items())}
