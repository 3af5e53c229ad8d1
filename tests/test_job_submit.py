"""``grand run`` submitted through the Ray Jobs API (the path of ``ray job submit``) to a local
head started with ``ray start``, token authentication on, the shipped deploy/runtime_env.yaml."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from grand_pipeline.run_meta import RunMeta
from grand_pipeline.sample import make_sample
from grand_pipeline.store import Store
from grand_pipeline.units import unit_id

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_dashboard(url: str, headers: dict[str, str], head: subprocess.Popen, log: Path):
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 180
    while True:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}:\n{log.read_text()[-3000:]}")
        try:
            return JobSubmissionClient(url, headers=headers)
        except Exception:  # noqa: BLE001 - not up yet
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


@pytest.fixture(scope="module")
def cluster():
    """A private head: its own ports, temp dir and token. Only this process group is stopped
    (never `ray stop`, which would take down every Ray on a shared machine)."""
    token = secrets.token_hex(32)
    temp = Path(tempfile.mkdtemp(prefix="grand-ray-", dir="/tmp"))  # short: Ray's socket paths
    port, dash = _free_port(), _free_port()
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    log = temp / "head.log"
    command = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", f"--port={port}", "--include-dashboard=true",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", "--num-gpus=0",
        f"--temp-dir={temp}", "--disable-usage-stats",
    ]
    with open(log, "wb") as sink:
        head = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        client = _wait_for_dashboard(url, {"Authorization": f"Bearer {token}"}, head, log)
        yield client, url
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # stragglers of this head's own session only
        except ProcessLookupError:
            pass
        shutil.rmtree(temp, ignore_errors=True)


def test_the_cluster_refuses_requests_without_the_token(cluster) -> None:
    from ray.job_submission import JobSubmissionClient

    _, url = cluster
    with pytest.raises(Exception) as err:
        JobSubmissionClient(url, headers={"Authorization": "Bearer wrong"})
    assert "auth" in str(err.value).lower() or "401" in str(err.value) or "403" in str(err.value)


def _submit(client, entrypoint: str, runtime_env: dict) -> str:
    """Submit, waiting out "No available agent to submit job": the head's job agent registers a
    while after the dashboard answers, later still on a loaded machine."""
    deadline = time.monotonic() + 120
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(3)


def test_grand_run_as_a_ray_job_commits_its_shard(cluster, tmp_path, tiny_cfg) -> None:
    from ray.job_submission import JobStatus

    client, _ = cluster
    make_sample(str(tmp_path / "in"), tiny_cfg, images=2, shard_id="sa_000020", start=1)
    out = tmp_path / "out"
    runtime_env = yaml.safe_load((REPO / "deploy" / "runtime_env.yaml").read_text())
    runtime_env["working_dir"] = str(REPO)
    # The tests' private weights cache instead of the deployment's.
    runtime_env["env_vars"]["GRAND_CACHE_DIR"] = os.environ["GRAND_CACHE_DIR"]
    entrypoint = (f"grand run --input {tmp_path / 'in'} --output {out} --profile tiny-lite "
                  "--executor ray --set engine.ray_address=auto")
    job_id = _submit(client, entrypoint, runtime_env)

    deadline = time.monotonic() + 600
    status = client.get_job_status(job_id)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, f"job still {status}:\n{client.get_job_logs(job_id)[-3000:]}"
        time.sleep(3)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]

    store = Store(str(out))
    unit = unit_id("sa_000020", 0)  # two images: one unit
    markers = store.committed(1, verify=True)
    assert list(markers) == [unit]
    assert (markers[unit]["unit"], markers[unit]["shard"]) == (unit, "sa_000020")
    assert markers[unit]["rows"] == 2
    assert markers[unit]["ok"] + markers[unit]["failed"] == 2
    assert store.read(1, unit).num_rows == 2
    assert RunMeta(store).read_index("sa_000020").unit_ids() == [unit]
    # The status table that `grand run` prints at the end: level 1, units 1/1, shards 1/1.
    assert any(line.split()[:3] == ["1", "1/1", "1/1"] for line in logs.splitlines()), logs[-3000:]
    info = client.get_job_info(job_id)
    assert info.entrypoint == entrypoint and info.runtime_env["working_dir"].startswith("gcs://")
