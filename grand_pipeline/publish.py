"""The one staging-then-publish rule: a file is written under a staging name, then made visible
under its final name in one step, so a reader sees the whole file or none.

The output store, its commit protocol and the training checkpoints all write through here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from fsspec.implementations.local import LocalFileSystem


def publish(fs: Any, src: str, dst: str) -> None:
    """Make ``src`` visible as ``dst``, overwriting it (the parent folder must exist locally).

    Locally this is ``os.replace``: atomic, and it overwrites (``shutil.move``, which fsspec's
    local ``mv`` uses, does not promise that). Elsewhere it is ``fs.mv``: on S3 a server-side copy
    (the destination appears whole) and a delete. Nothing relies on it being atomic there: only
    a claim holder publishes, and the marker, written last, decides.
    """
    if isinstance(fs, LocalFileSystem):
        os.replace(src, dst)
    else:
        fs.mv(src, dst)


def remove_quietly(fs: Any, path: str) -> None:
    """Delete ``path`` if it exists."""
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def put_atomic(
    fs: Any, staged: str, path: str, data: bytes, publish_fn: Callable[[str, str], None] | None = None
) -> None:
    """Write ``data`` to the staging name ``staged``, then publish it as ``path``; the staged file is
    removed if publishing fails, so a reader sees the whole file or none."""
    fs.pipe_file(staged, data)
    try:
        (publish_fn or (lambda a, b: publish(fs, a, b)))(staged, path)
    except BaseException:
        remove_quietly(fs, staged)
        raise
