"""Where training writes (local path or any fsspec URI, S3 included), with the store's discipline.

Every file is written under a staging name and then published (``os.replace`` locally, a
server-side copy on object stores); a folder (a checkpoint, an export) gets its marker last, and
the marker names each file's size and sha256. A kill at any moment leaves either no marker (the
folder does not count and is rewritten next time) or a complete folder, plus staging debris under
``_staging/`` that :func:`clear_staging` removes. Only rank 0 writes, so no fencing is needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from grand_pipeline.publish import publish, put_atomic, remove_quietly

logger = logging.getLogger(__name__)

STAGING = "_staging"


@dataclass(frozen=True)
class Location:
    """A folder on a file system: ``fs`` and its ``root`` path (no protocol), from a URI."""

    fs: Any
    root: str
    uri: str

    @classmethod
    def of(cls, uri: str) -> Location:
        # Listings are not cached on object stores: a rerun must see what the killed run left.
        local = fsspec.utils.get_protocol(uri) in ("file", "local")
        fs, root = fsspec.core.url_to_fs(uri, **({} if local else {"use_listings_cache": False}))
        return cls(fs, root.rstrip("/") or "/", uri.rstrip("/"))

    @property
    def local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def child(self, *parts: str) -> Location:
        return Location(self.fs, self.path(*parts), posixpath.join(self.uri, *parts))

    def read(self, *parts: str) -> bytes | None:
        try:
            return self.fs.cat_file(self.path(*parts))
        except FileNotFoundError:
            return None

    def listdir(self) -> list[str]:
        """Names directly under the folder (empty when it does not exist)."""
        try:
            return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False))
        except FileNotFoundError:
            return []

    def _publish(self, src: str, dst: str) -> None:
        """Make ``src`` visible as ``dst`` (:func:`~grand_pipeline.publish.publish`)."""
        self.fs.makedirs(posixpath.dirname(dst), exist_ok=True)
        publish(self.fs, src, dst)

    def _staged(self, name: str) -> str:
        staged = self.path(STAGING, f"{name}.{uuid.uuid4().hex}")
        self.fs.makedirs(posixpath.dirname(staged), exist_ok=True)
        return staged

    def write_atomic(self, name: str, data: bytes) -> None:
        """Write ``data`` to ``name`` under this folder: whole or not at all."""
        put_atomic(self.fs, self._staged(posixpath.basename(name)), self.path(name), data, self._publish)

    def _remove(self, path: str) -> None:
        remove_quietly(self.fs, path)

    def write_folder(self, name: str, files: dict[str, bytes], marker: str, record: dict[str, Any]) -> None:
        """Publish ``files`` into the sub-folder ``name``, then its ``marker`` (``record`` plus
        each file's size and sha256). An old marker goes first, so a half-rewritten folder never
        looks complete."""
        folder = self.child(name)
        folder._remove(folder.path(marker))
        digests = {}
        for filename, data in files.items():
            folder.write_atomic(filename, data)
            digests[filename] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        body = json.dumps({**record, "files": digests}, sort_keys=True, indent=1).encode()
        folder.write_atomic(marker, body)
        folder.clear_staging()

    def read_marker(self, marker: str) -> dict[str, Any] | None:
        """The folder's marker when it parses and every file it names has the recorded size."""
        raw = self.read(marker)
        try:
            record = json.loads(raw) if raw is not None else None
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
            return None
        for filename, meta in record["files"].items():
            try:
                if self.fs.size(self.path(filename)) != meta.get("bytes"):
                    return None
            except FileNotFoundError:
                return None
        return record

    def read_verified(self, filename: str, record: dict[str, Any]) -> bytes:
        """A file of a marked folder, checked against the marker's sha256."""
        data = self.read(filename)
        want = record["files"].get(filename, {}).get("sha256")
        if data is None or hashlib.sha256(data).hexdigest() != want:
            raise OSError(f"{self.uri}/{filename} does not match its marker (damaged or rewritten)")
        return data

    def clear_staging(self) -> None:
        """Remove the staging debris of killed writes (only rank 0 writes, so none is live)."""
        try:
            self.fs.rm(self.path(STAGING), recursive=True)
        except FileNotFoundError:
            pass
