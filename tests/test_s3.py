"""Input and output on S3 (moto's server, reached over HTTP through ``AWS_ENDPOINT_URL``).

Covers the commit protocol without atomic rename, resume, an upload refused in the middle of a
shard's commit (the marker PUT fails after the Parquet landed), and kill -9 of a real
``grand run`` followed by a rerun; each compared byte for byte with an undisturbed run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote, unquote

import boto3
import pyarrow as pa
import pytest

from grand_pipeline import fencing
from grand_pipeline.commit import clear_staging, commit
from grand_pipeline.run_meta import RunMeta
from grand_pipeline.sample import make_sample
from grand_pipeline.store import NotCommitted, Store
from grand_pipeline.units import unit_id
from tests.s3_server import S3Endpoint
from tests.test_store import STATS, make_table

REPO = Path(__file__).resolve().parents[1]
BUCKET = "grand-test"
SHARDS = [f"sa_00004{k}" for k in range(3)]
UNITS = [unit_id(shard, 0) for shard in SHARDS]  # two images a shard: one unit each


@pytest.fixture(scope="module")
def s3(tmp_path_factory, tiny_cfg):
    endpoint = S3Endpoint().start()
    saved = {k: os.environ.get(k) for k in endpoint.env()}
    os.environ.update(endpoint.env())
    try:
        client = boto3.client("s3", endpoint_url=endpoint.url)
        client.create_bucket(Bucket=BUCKET)
        folder = tmp_path_factory.mktemp("s3-input")
        for k, shard in enumerate(SHARDS):
            path = make_sample(str(folder), tiny_cfg, images=2, shard_id=shard, start=1 + 2 * k)
            client.upload_file(str(path), BUCKET, f"input/{Path(path).name}")
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        endpoint.stop()


def _command(out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "grand_pipeline.cli", "run", "-i", f"s3://{BUCKET}/input",
            "-o", out, "--profile", "tiny-lite", "--executor", "local", *extra]


def _run(out: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_command(out, *extra), cwd=REPO, capture_output=True, text=True, timeout=900)


def _staging(store: Store) -> list[str]:
    try:
        return store.fs.ls(f"{store.level_dir(1)}/_staging", detail=False)
    except FileNotFoundError:  # S3 has no empty directories
        return []


def _parquets(uri: str) -> dict[str, bytes]:
    store = Store(uri)
    paths = sorted(p for p in store.fs.ls(store.level_dir(1), detail=False) if p.endswith(".parquet"))
    return {p.rsplit("/", 1)[1]: store.fs.cat_file(p) for p in paths}


@pytest.fixture(scope="module")
def reference(s3, tmp_path_factory) -> dict[str, bytes]:
    """The undisturbed run: S3 input, local output."""
    out = tmp_path_factory.mktemp("s3-reference")
    done = _run(str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    parquets = {p.name: p.read_bytes() for p in sorted((out / "level1").glob("*.parquet"))}
    assert sorted(parquets) == [f"{unit}.parquet" for unit in UNITS]
    return parquets


def test_commit_protocol_on_s3(s3) -> None:
    store = Store(f"s3://{BUCKET}/unit")
    s1 = unit_id("s1", 0)
    table = make_table("s1", n=3)
    assert commit(store, 1, s1, table, STATS, attempt=1)
    assert store.is_committed(1, s1) and set(store.committed(1, verify=True)) == {s1}
    assert store.fs.exists(f"{store.level_dir(1)}/s1@00000.parquet")
    assert store.read(1, s1).equals(pa.Table.from_arrays(table.columns, schema=table.schema))
    assert pa.Table.from_batches(list(store.iter_batches(1, s1))).equals(store.read(1, s1))
    # A second commit is fenced by the valid marker; the conditional create refuses a second claim.
    assert commit(store, 1, s1, make_table("s1", n=2), STATS, attempt=2) is False
    assert store.marker(1, s1)["attempt"] == 1
    claim = f"{store.claim_dir(1, s1)}/000099.json"
    assert fencing.create_exclusive(store.fs, claim, b"{}") is True
    assert fencing.create_exclusive(store.fs, claim, b"{}") is False

    # Parquet replaced behind the marker's back: not committed, and a new commit repairs it.
    store.fs.pipe_file(store.parquet_path(1, s1), b"not parquet")
    assert not store.is_committed(1, s1) and store.committed(1) == {}
    with pytest.raises(NotCommitted):
        store.read(1, s1)
    with pytest.raises(NotCommitted):
        list(store.iter_batches(1, s1))
    assert commit(store, 1, s1, table, STATS, attempt=3)
    # Parquet without marker (a crash between the two uploads) is not a commit.
    store.fs.rm_file(store.marker_path(1, s1))
    assert not store.is_committed(1, s1)
    # Staging debris of a dead attempt goes; nothing else does.
    store.fs.pipe_file(f"{store.level_dir(1)}/_staging/{s1}.a77.{'0' * 32}.parquet", b"x")
    clear_staging(store, 1)
    assert _staging(store) == []
    assert store.fs.exists(store.parquet_path(1, s1))


def test_resume_on_s3(s3, reference) -> None:
    out = f"s3://{BUCKET}/resume"
    first = _run(out, "--limit", "2")
    assert first.returncode == 0, first.stderr[-2000:]
    store = Store(out)
    before = store.committed(1)
    assert set(before) == set(UNITS[:2])
    assert RunMeta(store).read_index(SHARDS[0]).unit_ids() == [UNITS[0]]  # the index is stored with the output
    second = _run(out)
    assert second.returncode == 0, second.stderr[-2000:]
    after = store.committed(1, verify=True)
    assert set(after) == set(UNITS)
    for unit in UNITS[:2]:  # resumed: not recomputed
        assert after[unit]["attempt"] == before[unit]["attempt"]
        assert after[unit]["committed_at"] == before[unit]["committed_at"]
    assert _parquets(out) == reference


def test_refused_upload_mid_commit_then_rerun(s3, reference) -> None:
    out = f"s3://{BUCKET}/fault"
    victim = UNITS[1]
    # The marker, after the Parquet has landed; '@' travels percent-encoded in the request path.
    s3.fail_puts = {f"{victim}.success.json", f"{quote(victim)}.success.json"}
    try:
        failed = _run(out)
    finally:
        s3.fail_puts = set()
    assert failed.returncode == 1, failed.stderr[-2000:]
    assert any(victim in unquote(path) for path in s3.refused)
    store = Store(out)
    assert set(store.committed(1)) == set(UNITS) - {victim}
    assert store.fs.exists(store.parquet_path(1, victim)), "the Parquet upload itself succeeded"
    assert not store.is_committed(1, victim)

    rerun = _run(out)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert set(store.committed(1, verify=True)) == set(UNITS)
    assert _parquets(out) == reference
    assert _staging(store) == []


def test_sigkill_mid_run_then_resume_on_s3(s3, reference) -> None:
    out = f"s3://{BUCKET}/killed"
    store = Store(out)
    proc = subprocess.Popen(_command(out), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while proc.poll() is None and not store.committed(1) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)  # into the next shard (or its commit)
    killed_mid_run = proc.poll() is None
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    assert killed_mid_run, "the run finished before the kill; the test proved nothing"
    assert len(store.committed(1)) < len(UNITS)

    rerun = _run(out)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert set(store.committed(1, verify=True)) == set(UNITS)
    assert _parquets(out) == reference
    assert _staging(store) == []
