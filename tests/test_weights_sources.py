"""Weight sources of the full profile: hub snapshots, fsspec URIs, and the fast offline failure.

The hub cache used here is a real ``HF_HUB_CACHE`` layout (``models--org--name/snapshots/<commit>``
plus ``refs/``) read by huggingface_hub's own ``snapshot_download(local_files_only=True)``; the
remote source is fsspec's in-memory filesystem. No test touches the network: an unreachable hub
is a blackhole address (the probe's timeout) or a closed loopback port (refused at once).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from grand_pipeline.models import weights
from grand_pipeline.models.weights import ModelSourceError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
#: TEST-NET-1 (RFC 5737): never routed, so a connection attempt hangs until the probe gives up.
BLACKHOLE = "http://192.0.2.1"


def _fake_hub_cache(root: Path, repo: str, files: dict[str, bytes]) -> Path:
    folder = root / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / COMMIT
    for name, data in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(data)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_cached_hub_snapshot_resolves_offline_with_commit_identity(hub_cache, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = _fake_hub_cache(hub_cache, "org/model", {"config.json": b"{}", "ckpt/w.pth": b"abc"})
    for rev in (COMMIT, "main"):
        got = weights.resolve(f"hf:org/model@{rev}", name="t")
        assert got.path == snapshot
        assert got.sha256.startswith(f"hf:org/model@{COMMIT} sha256:")
    one = weights.resolve(f"hf:org/model@{COMMIT}/ckpt/w.pth", name="t")
    assert one.path == snapshot / "ckpt" / "w.pth"
    assert one.sha256 == f"hf:org/model@{COMMIT}/ckpt/w.pth sha256:{weights.sha256_of(one.path)}"


def test_missing_hub_model_offline_names_it_and_how_to_get_it(hub_cache, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError) as err:
        weights.resolve(f"hf:org/absent@{COMMIT}", name="blip2")
    message = str(err.value)
    assert "org/absent" in message and "HF_HUB_OFFLINE" in message
    assert f"hf download org/absent --revision {COMMIT}" in message and "\n" not in message


def test_unreachable_hub_fails_within_the_probe_timeout(hub_cache, monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", BLACKHOLE)
    start = time.perf_counter()
    with pytest.raises(ModelSourceError, match="cannot be reached"):
        weights.resolve(f"hf:org/absent@{COMMIT}", name="llava")
    assert time.perf_counter() - start < weights.PROBE_TIMEOUT + 2


def test_check_sources_probes_once_and_names_every_missing_model(hub_cache, monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", BLACKHOLE)
    _fake_hub_cache(hub_cache, "org/present", {"config.json": b"{}"})

    class Spec:
        def __init__(self, model: str) -> None:
            self.model = model

    specs = [(f"m{i}", Spec(f"hf:org/absent{i}@{COMMIT}")) for i in range(4)]
    specs.append(("ok", Spec(f"hf:org/present@{COMMIT}")))
    start = time.perf_counter()
    with pytest.raises(ModelSourceError) as err:
        weights.check_sources(specs)
    assert time.perf_counter() - start < weights.PROBE_TIMEOUT + 2, "one probe for all models"
    assert "models.m0" in str(err.value) and "models.m3 (org/absent3@" in str(err.value)
    assert "present" not in str(err.value)
    weights.check_sources(specs[-1:])  # cached models need no network at all


def test_fsspec_source_is_copied_once_then_used_offline(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GRAND_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    fs = fsspec.filesystem("memory")
    fs.pipe({"/bucket/sam/sam_tiny.pth": b"weights-1", "/bucket/clip/config.json": b"{}",
             "/bucket/clip/model.safetensors": b"tensor"})  # fmt: skip
    one = weights.resolve("memory://bucket/sam/sam_tiny.pth", name="sam")
    assert one.path.is_file() and one.path.read_bytes() == b"weights-1"
    folder = weights.resolve("memory://bucket/clip", name="clip")
    assert sorted(p.name for p in folder.path.iterdir()) == ["config.json", "model.safetensors"]
    fs.rm("/bucket", recursive=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = weights.resolve("memory://bucket/clip", name="clip")
    assert again.path == folder.path and again.sha256 == folder.sha256
    with pytest.raises(ModelSourceError, match="not in the cache"):
        weights.resolve("memory://bucket/other", name="x")


def _grand_run_full(tmp_path: Path, env_extra: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    images = tmp_path / "in"
    images.mkdir(exist_ok=True)
    Image.fromarray(np.full((48, 64, 3), 120, np.uint8)).save(images / "a.jpg")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HUB_CACHE=str(tmp_path / "empty-hub"), **env_extra)
    cmd = [sys.executable, "-m", "grand_pipeline.cli", "run", "-i", str(images), "-o", str(tmp_path / "out"),
           "--profile", "full", "--levels", "1-4", "--executor", "local"]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    return done, time.perf_counter() - start


@pytest.mark.parametrize(
    ("env_extra", "why"),
    [({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"), ({"HF_ENDPOINT": BLACKHOLE}, "cannot be reached")],
    ids=["hf-hub-offline", "no-network"],
)
def test_grand_run_full_without_weights_fails_fast_in_one_line(tmp_path, env_extra, why) -> None:
    done, seconds = _grand_run_full(tmp_path, env_extra)
    assert done.returncode == 2, done.stderr[-2000:]
    assert seconds < 10, f"took {seconds:.1f}s"
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("grand: error: models.") and why in lines[0]
    assert "hf download" in lines[0] and "--revision" in lines[0]
    assert not (tmp_path / "out" / "level1").exists(), "no actor may start"
