"""Checks of an output location before a command reads or writes it: a mistyped ``--output``, an
output inside the input, a file in the way or a read-only folder is one clear line
(:class:`~grand_pipeline.store.StoreError`), and a refused run has written nothing.
"""

from __future__ import annotations

import os
import posixpath
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

from grand_pipeline.store import Store, StoreError


def _location(uri: str) -> tuple[str, str]:
    """(protocol, normalised absolute path) of ``uri``: local paths resolved (symlinks, ``..``),
    other URIs by their filesystem's own protocol name (``s3a://`` is ``s3://``)."""
    protocol = fsspec.utils.get_protocol(uri)
    if protocol in ("file", "local"):
        return "file", os.path.realpath(LocalFileSystem._strip_protocol(uri))
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError):  # an unknown protocol fails later with its own message
        return protocol, posixpath.normpath("/" + uri.split("://", 1)[-1])
    name = cls.protocol if isinstance(cls.protocol, str) else cls.protocol[0]
    return name, posixpath.normpath("/" + cls._strip_protocol(uri).strip("/"))


def check_separate(input_uri: str, output_uri: str) -> None:
    """Refuse an output inside (or equal to) the input folder: the input listing would pick up the
    output's own files, and a mistaken run must be refused before it writes anything."""
    (in_proto, in_path), (out_proto, out_path) = _location(input_uri), _location(output_uri)
    if in_proto == out_proto and (out_path == in_path or out_path.startswith(in_path.rstrip("/") + "/")):
        raise StoreError(
            f"--output {output_uri} is inside --input {input_uri}: write the output outside the input folder"
        )


def require_existing(store: Store) -> None:
    """For commands that read a run: the output must be a folder (or a non-empty prefix)."""
    try:
        exists, is_dir = store.fs.exists(store.root), store.fs.isdir(store.root)
    except OSError as exc:
        raise StoreError(f"output {store.uri} cannot be read: {exc.strerror or exc}") from None
    if not exists:
        raise StoreError(f"output {store.uri} does not exist: check --output, or run `grand run` first")
    if not is_dir:
        raise StoreError(f"output {store.uri} is a file, not an output folder")


def check_no_file_in_the_way(store: Store) -> None:
    """Refuse a local output that is a file or lies under one (reads only: a run checks this
    before it even reads the output's commits)."""
    if not isinstance(store.fs, LocalFileSystem):
        return
    blocker = next((p for p in _ancestors(store.root) if os.path.exists(p) and not os.path.isdir(p)), None)
    if blocker is not None:
        where = "is a file" if blocker == store.root else f"is under the file {blocker}"
        raise StoreError(f"output {store.uri} {where}: --output must be a folder")


def check_writable(store: Store) -> None:
    """Create the output folder and write + remove a probe file there, so that a file in the
    way, a read-only folder or ``/proc`` is one clear line before any run metadata exists.

    Object stores have no folders and their permissions show at the first write; they are
    not probed (the first write's error names the path).
    """
    if not isinstance(store.fs, LocalFileSystem):
        return
    check_no_file_in_the_way(store)
    probe = store.path(f".grand-write-probe.{uuid.uuid4().hex}")
    try:
        os.makedirs(store.root, exist_ok=True)
        with open(probe, "xb"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise StoreError(f"output {store.uri} is not writable: {exc.strerror or exc}") from None


def _ancestors(path: str) -> list[str]:
    """``path`` and every folder above it, nearest first."""
    out = [path]
    while (parent := os.path.dirname(out[-1])) != out[-1]:
        out.append(parent)
    return out
