"""A broken LLM stops the run loudly instead of committing empty captions as ``ok``.

Two ways an LLM breaks on a cluster: it cannot answer at all (no chat template, a vLLM that cannot
start), which the start-up probe catches before any unit is taken; or it dies after starting (a
GPU that faults), which makes every generation of a unit fail: that unit is not committed, it is
retried, and the run exits 1 naming the error.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from grand_pipeline.sample import make_sample
from grand_pipeline.store import Store

REPO = Path(__file__).resolve().parents[1]


def _run(inp: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "grand_pipeline.cli", "run", "-i", str(inp), "-o", str(out),
           "--profile", "tiny-lite", "--executor", "local", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)


@pytest.fixture(scope="module")
def level2_done(tmp_path_factory, tiny_cfg) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("llm-failures")
    make_sample(str(root / "in"), tiny_cfg, images=2, shard_id="sa_000050", start=1)
    done = _run(root / "in", root / "out", "--levels", "1-2")
    assert done.returncode == 0, done.stderr[-2000:]
    return root / "in", root / "out"


def _broken(after_probe: bool) -> list[str]:
    options = "{after_probe: true}" if after_probe else "{}"
    return ["--level", "3", "--set", "plugins=[tests.fault_plugin]",
            "--set", f"models.llm={{backend: broken_llm, model: 'tiny:0', options: {options}}}",
            "--set", "engine.max_shard_retries=1"]


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("grand: error", "failed:"))]


def test_an_llm_that_cannot_answer_stops_the_run_before_any_unit(level2_done, tmp_path) -> None:
    inp, base = level2_done
    out = tmp_path / "out"
    shutil.copytree(base, out)
    done = _run(inp, out, *_broken(after_probe=False))
    assert done.returncode == 1
    lines = _error_lines(done.stderr)
    assert len(lines) == 1, done.stderr[-2000:]
    assert "start-up" in lines[0] and "broken_llm" in lines[0] and "illegal memory access" in lines[0]
    assert Store(str(out)).committed(3) == {}


def test_a_unit_whose_generations_all_fail_is_not_committed(level2_done, tmp_path) -> None:
    inp, base = level2_done
    out = tmp_path / "out"
    shutil.copytree(base, out)
    done = _run(inp, out, *_broken(after_probe=True))
    assert done.returncode == 1
    lines = _error_lines(done.stderr)
    assert lines and lines[0].startswith("failed: level3/sa_000050@00000"), done.stderr[-2000:]
    assert "the LLM failed on all 2 row(s)" in lines[0] and "illegal memory access" in lines[0]
    assert Store(str(out)).committed(3) == {}
    # The same command with a working LLM then commits the unit: nothing was left half-done.
    again = _run(inp, out, "--level", "3")
    assert again.returncode == 0, again.stderr[-2000:]
    rows = Store(str(out)).read(3, "sa_000050@00000").to_pylist()
    assert rows and all(r["status"] == "ok" and r["dense_caption"] for r in rows)
