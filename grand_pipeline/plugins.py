"""Entry-point plugins: extra CLI command groups and export formats, found by package metadata.

The core never imports the training wing (or any other add-on). An add-on declares itself in its
``pyproject.toml``:

- ``grand.commands``: ``name = "pkg.module:typer_app"``, mounted as ``grand <name> ...``;
- ``grand.export_formats``: ``name = "pkg.module"``, a module whose import registers formats in
  ``grand_pipeline.export.FORMATS``.

A plugin that fails to load is logged and skipped, so a broken add-on never takes down
``grand run``; the error names the entry point.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import Any

logger = logging.getLogger(__name__)

COMMANDS = "grand.commands"
EXPORT_FORMATS = "grand.export_formats"


def load(group: str) -> dict[str, Any]:
    """Load every entry point of ``group``: name -> loaded object, in name order."""
    loaded: dict[str, Any] = {}
    for ep in sorted(entry_points(group=group), key=lambda e: e.name):
        try:
            loaded[ep.name] = ep.load()
        except Exception:  # an add-on's own bug: report it, keep the core usable
            logger.exception("plugin %s (%s = %s) failed to load", group, ep.name, ep.value)
    return loaded
