"""The GLaMM companion: committed GranD rows -> GLaMM training samples, exports and evaluation.

Nothing outside this package imports it; the ``grand`` CLI mounts its commands and export formats
through the ``grand.plugins`` entry point (see ``plugin.py``).
"""
