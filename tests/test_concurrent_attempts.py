"""Two attempts of one run writing at once (a RayJob retry overlapping the first driver).

Two real ``grand run`` processes share input and output. Every (level, unit) must be committed
exactly once: one claim per unit in the claim log, the marker naming that claim's attempt, and
the bytes identical to one undisturbed run. Plus the fencing primitives on their own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from grand_pipeline import fencing
from grand_pipeline.run_meta import RunMeta
from grand_pipeline.sample import make_sample
from grand_pipeline.store import Store
from grand_pipeline.units import unit_id

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_cfg) -> Path:
    folder = tmp_path_factory.mktemp("concurrent-input")
    for k in range(4):
        make_sample(str(folder), tiny_cfg, images=2, shard_id=f"sa_00003{k}", start=1 + 2 * k)
    return folder


def _command(inp: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "grand_pipeline.cli", "run", "-i", str(inp), "-o", str(out),
            "--profile", "tiny-lite", "--executor", "local"]


def _snapshot(out: Path) -> dict[str, bytes]:
    return {f"{p.parent.name}/{p.name}": p.read_bytes() for p in sorted(out.glob("level*/*.parquet"))}


def test_two_concurrent_runs_commit_each_shard_exactly_once(shards, tmp_path) -> None:
    reference = tmp_path / "reference"
    subprocess.run(_command(shards, reference), cwd=REPO, check=True, capture_output=True)
    expected = _snapshot(reference)
    # Two images a shard: one unit each.
    assert sorted(expected) == [f"level1/{unit_id(f'sa_00003{k}', 0)}.parquet" for k in range(4)]

    out = tmp_path / "shared"
    procs = [subprocess.Popen(_command(shards, out), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err[-2000:]

    assert _snapshot(out) == expected
    attempts = sorted(int(p.stem) for p in (out / "_run" / "attempts").glob("*.json"))
    assert attempts == [1, 2], "each driver must hold its own attempt number"
    store = Store(str(out))
    commits_by_attempt = {1: 0, 2: 0}
    for level in (1,):
        markers = store.committed(level, verify=True)
        assert sorted(markers) == [unit_id(f"sa_00003{k}", 0) for k in range(4)]
        for unit, marker in markers.items():
            log = fencing.claims(store.fs, store.claim_dir(level, unit))
            # Exactly one attempt ever claimed the right to publish it, and it wrote the marker.
            assert len(log) == 1, (level, unit, log)
            assert (log[0]["attempt"], log[0]["generation"]) == (marker["attempt"], marker["generation"])
            commits_by_attempt[marker["attempt"]] += 1
    fenced = sum(err.count("not by this attempt") for _, err in results)
    # Every (level, unit) one driver computed but the other committed shows up as fenced.
    print(f"commits by attempt {commits_by_attempt}, fenced {fenced}")
    assert sum(commits_by_attempt.values()) == 4
    assert not list(out.glob("level*/_staging/*"))


def test_exclusive_create_has_one_winner(tmp_path) -> None:
    fs = Store(str(tmp_path)).fs
    wins: list[int] = []
    barrier = threading.Barrier(8)

    def race(i: int) -> None:
        barrier.wait()
        if fencing.create_exclusive(fs, str(tmp_path / "c" / "000001.json"), json.dumps({"i": i}).encode()):
            wins.append(i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert json.loads((tmp_path / "c" / "000001.json").read_text()) == {"i": wins[0]}


def test_dead_claim_is_taken_over_and_live_one_is_not(tmp_path) -> None:
    fs = Store(str(tmp_path)).fs
    directory = str(tmp_path / "claims")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {**fencing.holder(), "pid": int(dead.stdout), "pid_start": "1", "attempt": 7, "claimed_at": 0.0}
    assert fencing.create_exclusive(fs, f"{directory}/000001.json", json.dumps(record).encode())
    result = fencing.acquire(fs, directory, 8, lambda: False, wait_s=0.0)
    assert (result.state, result.generation) == ("own", 2)
    assert fencing.still_owner(fs, directory, 2)

    # A live holder in another process (a sleeping child) is waited for, then reported busy.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = {**fencing.holder(), "pid": child.pid, "pid_start": fencing.process_start(child.pid),
                "attempt": 9, "claimed_at": 0.0}
        assert fencing.create_exclusive(fs, f"{directory}/000003.json", json.dumps(live).encode())
        busy = fencing.acquire(fs, directory, 10, lambda: False, wait_s=0.3)
        assert (busy.state, busy.record["attempt"]) == ("busy", 9)
        assert fencing.acquire(fs, directory, 10, lambda: True, wait_s=0.3).state == "committed"
    finally:
        child.kill()
        child.wait()
    assert fencing.acquire(fs, directory, 10, lambda: False, wait_s=0.0).generation == 4


def test_attempt_numbers_are_unique_under_concurrency(tmp_path) -> None:
    taken: list[int] = []
    barrier = threading.Barrier(6)

    def take() -> None:
        barrier.wait()
        taken.append(RunMeta(Store(str(tmp_path))).next_attempt())

    threads = [threading.Thread(target=take) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == [1, 2, 3, 4, 5, 6]
