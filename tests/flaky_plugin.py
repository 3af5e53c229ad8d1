"""A test-only plugin backend: the ground-plane depth prior, failing for chosen images.

Loaded through ``plugins: [tests.flaky_plugin]`` with ``models.depth.backend: flaky_ground_plane``.
Images whose (height, width) is listed in ``options.fail_shapes`` raise while the file
``options.flag`` exists; remove the flag and the same images succeed (``grand retry-failed``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from grand_pipeline.models.backends.ground_plane_depth import GroundPlaneDepth, GroundPlaneOptions
from grand_pipeline.models.roles import register_backend


@dataclass(frozen=True)
class FlakyOptions(GroundPlaneOptions):
    flag: str = ""
    fail_shapes: list[list[int]] = field(default_factory=list)


@register_backend("depth", "flaky_ground_plane", options=FlakyOptions)
class FlakyGroundPlane(GroundPlaneDepth):
    def depth(self, images: list[np.ndarray]) -> list[np.ndarray]:
        shapes = {tuple(s) for s in self.spec.options.get("fail_shapes", [])}
        if Path(self.spec.options["flag"]).exists():
            for image in images:
                if tuple(np.asarray(image).shape[:2]) in shapes:
                    raise RuntimeError(f"injected depth failure for a {np.asarray(image).shape[:2]} image")
        return super().depth(images)
