"""A test-only plugin backend: a detector that kills its own process on first use.

Loaded through ``plugins: [tests.fault_plugin]``; the flag file makes it die exactly once, so the
engine's replacement actor succeeds on the retry.
"""

from __future__ import annotations

import os
from pathlib import Path

from grand_pipeline.models.roles import Detections, Detector, register_backend


@register_backend("detector", "die_once")
class DieOnce(Detector):
    def detect(self, images, context=None):
        flag = Path(self.spec.options["flag"])
        if not flag.exists():
            flag.write_text("died")
            os._exit(1)  # no cleanup, like an OOM kill of the actor process
        return [Detections.empty("die_once") for _ in images]
