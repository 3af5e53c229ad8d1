"""ModelHub: builds each configured backend once per process (once per Ray actor) and caches it."""

from __future__ import annotations

import importlib
import logging
import time
from typing import Any

from grand_pipeline.config import ModelsConfig, ModelSpec
from grand_pipeline.models.roles import BACKENDS, Backend
from grand_pipeline.models.weights import ModelSourceError

logger = logging.getLogger(__name__)


def import_backends(plugins: list[str] | tuple[str, ...] = ()) -> None:
    """Register the built-in backends, then those of plugin modules (decorators run at import)."""
    import grand_pipeline.models.backends  # noqa: F401

    for module in plugins:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ModelSourceError(f"plugin module {module!r} cannot be imported: {exc}") from None


class ModelHub:
    """Resolves ``role`` or ``role.member`` keys of ``ModelsConfig`` to loaded backends."""

    def __init__(self, models: ModelsConfig, plugins: list[str] | tuple[str, ...] = ()) -> None:
        import_backends(plugins)
        self.models = models
        self._cache: dict[str, Backend] = {}

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

    def loaded(self) -> dict[str, dict[str, Any]]:
        return {key: backend.describe() for key, backend in sorted(self._cache.items())}
