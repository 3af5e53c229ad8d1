"""Every file in deploy/ parses and agrees with the code: the job command, pools, metrics."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from grand_pipeline.cli import app
from grand_pipeline.config import load_config, profiles
from grand_pipeline.metrics import METRIC_NAMES

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
LEVELS = (1, 2, 3, 4)
#: Where the container image puts the repository (deploy/kuberay/*.yaml refer to /app/deploy/...).
IMAGE_REPO = "/app/"


def load(name: str) -> Any:
    return yaml.safe_load((DEPLOY / name).read_text())


def test_every_deploy_file_is_covered_and_parses() -> None:
    files = sorted(p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*") if p.is_file())
    assert files == [
        "cluster.yaml", "grafana/grand.json", "kuberay/raycluster.yaml", "kuberay/rayjob-glamm-train.yaml",
        "kuberay/rayjob.yaml", "pools.yaml", "prometheus.yml", "runtime_env.yaml",
    ]
    for name in files:
        data = json.loads((DEPLOY / name).read_text()) if name.endswith(".json") else load(name)
        assert isinstance(data, dict) and data, name


# ------------------------------------------------------------------------------ job command
def parse_grand(command: str) -> Any:
    """Parse a ``grand ...`` command line with the CLI's own parser: unknown options fail."""
    argv = shlex.split(command)
    assert argv[0] == "grand", command
    cmd = typer.main.get_command(app)
    ctx, rest = cmd.make_context("grand", argv[1:]), argv[1:]
    # Groups (`grand`, the mounted `grand glamm`) have no options of their own, so each
    # sub-command's name is the first argument left.
    while hasattr(cmd, "resolve_command"):
        name, cmd, rest = cmd.resolve_command(ctx, rest)
        assert cmd is not None, command
        ctx = cmd.make_context(name, rest, parent=ctx)
    return ctx


def test_rayjob_entrypoint_is_a_real_grand_run_with_a_valid_config() -> None:
    job = load("kuberay/rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    ctx = parse_grand(job["spec"]["entrypoint"])
    assert ctx.info_name == "run"
    params = ctx.params
    assert params["input"].startswith("s3://") and params["output"].startswith("s3://")
    assert params["profile"] in profiles()
    assert params["config"].startswith(IMAGE_REPO + "deploy/")
    local = DEPLOY.parent / params["config"][len(IMAGE_REPO):]
    cfg = load_config(params["profile"], local, params["set_"] or [])  # typed validation
    assert cfg.engine.ray_address == "auto"
    for level in LEVELS:
        assert cfg.pool(level).resources == {f"grand_level{level}": 1.0}


def test_unknown_option_in_a_command_fails_the_parser() -> None:
    good = load("kuberay/rayjob.yaml")["spec"]["entrypoint"]
    # typer vendors click, so its exception classes are matched by name, not imported.
    with pytest.raises(Exception) as err:
        parse_grand(good + " --shard-glob 'sa_*'")
    assert type(err.value).__name__ == "NoSuchOption" and "--shard-glob" in str(err.value)
    with pytest.raises(Exception) as err:
        parse_grand("grand runn --input a --output b")
    assert "UsageError" in {c.__name__ for c in type(err.value).__mro__} and "runn" in str(err.value)


def test_glamm_train_rayjob_is_a_real_grand_glamm_train_on_its_gpu_workers() -> None:
    from grand_pipeline.training.config import load_train_config, train_profiles
    from grand_pipeline.training.train.launch import check_capacity

    job = load("kuberay/rayjob-glamm-train.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    ctx = parse_grand(job["spec"]["entrypoint"])
    assert ctx.info_name == "train" and ctx.parent.info_name == "glamm"
    params = ctx.params
    assert params["output"].startswith("s3://") and params["config"] in train_profiles()
    assert params["executor"] == "ray" and params["workers"]
    cfg = load_train_config(params["config"], params["set_"] or [], steps=params["steps"],
                            executor=params["executor"], workers=params["workers"])  # typed validation
    assert cfg.launch.ray_address == "auto" and cfg.launch.use_gpu
    spec = job["spec"]["rayClusterSpec"]
    assert spec["authOptions"] == {"mode": "token"} and not spec["enableInTreeAutoscaling"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (group,) = spec["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    # What the fixed cluster offers must hold the worker group (the driver's own check passes).
    cluster = {"CPU": float(limits["cpu"]) * group["replicas"], "GPU": float(limits["nvidia.com/gpu"]) * group["replicas"]}
    check_capacity(cfg.launch, cluster)
    check_runtime_env(yaml.safe_load(job["spec"]["runtimeEnvYAML"]))
    with pytest.raises(Exception) as err:
        parse_grand(job["spec"]["entrypoint"] + " --epochs 3")
    assert type(err.value).__name__ == "NoSuchOption"


def test_training_metrics_pass_the_prometheus_keep_rule() -> None:
    from grand_pipeline.training.train.metrics import TRAIN_METRIC_NAMES

    keep = [r for job in load("prometheus.yml")["scrape_configs"]
            for r in job.get("metric_relabel_configs", []) if r["action"] == "keep"]
    for name in TRAIN_METRIC_NAMES.values():
        assert all(re.fullmatch(r["regex"], f"ray_{name}") for r in keep), name


# ------------------------------------------------------------------------- runtime env and pools
def check_runtime_env(env: dict) -> None:
    from ray.runtime_env import RuntimeEnv

    unknown = set(env) - set(RuntimeEnv.known_fields)
    assert not unknown, f"not Ray runtime_env fields: {sorted(unknown)}"
    RuntimeEnv(**env)  # Ray's own validation of the known fields
    assert all(isinstance(v, str) for v in env.get("env_vars", {}).values()), "env_vars must be strings"


def test_runtime_envs_use_only_ray_fields() -> None:
    check_runtime_env(load("runtime_env.yaml"))
    check_runtime_env(yaml.safe_load(load("kuberay/rayjob.yaml")["spec"]["runtimeEnvYAML"]))
    with pytest.raises(AssertionError, match="env_var"):
        check_runtime_env({"env_var": {"A": "1"}})


def test_cluster_launcher_yaml_follows_rays_own_schema() -> None:
    import jsonschema  # a dependency of ray
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = load("cluster.yaml")
    jsonschema.validate(config, schema)
    config["available_node_types"]["level1_gpu"]["min_worker"] = 0  # a typo must not pass
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        jsonschema.validate(config, schema)


def _group_resources(params: dict) -> dict[str, float]:
    raw = params.get("resources", "")
    return json.loads(raw.strip("'\"").replace('\\"', '"')) if raw else {}


def test_each_level_has_its_own_worker_group_everywhere() -> None:
    pools = load_config("lite", DEPLOY / "pools.yaml")
    launcher = load("cluster.yaml")["available_node_types"]
    cluster = load("kuberay/raycluster.yaml")["spec"]
    job_cluster = load("kuberay/rayjob.yaml")["spec"]["rayClusterSpec"]
    assert cluster == job_cluster, "the RayJob's cluster must match deploy/kuberay/raycluster.yaml"
    for spec in (cluster, job_cluster):
        assert spec["authOptions"] == {"mode": "token"}
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    kuberay = {g["groupName"]: _group_resources(g["rayStartParams"]) for g in cluster["workerGroupSpecs"]}
    assert launcher["head"]["resources"] == {"CPU": 0}
    for level in LEVELS:
        name = f"grand_level{level}"
        wanted = pools.pool(level).resources[name]
        groups = [n for n, t in launcher.items() if name in t.get("resources", {})]
        assert groups == [f"level{level}_gpu"], (name, groups)
        assert launcher[groups[0]]["resources"][name] >= wanted
        assert [g for g, res in kuberay.items() if name in res] == [f"level{level}-gpu"]
        assert kuberay[f"level{level}-gpu"][name] >= wanted


# ---------------------------------------------------------------------------- Prometheus
def test_prometheus_scrapes_rays_service_discovery_and_keeps_our_series() -> None:
    config = load("prometheus.yml")
    jobs = config["scrape_configs"]
    assert jobs and all(job["job_name"] for job in jobs)
    files = [f for job in jobs for sd in job.get("file_sd_configs", []) for f in sd["files"]]
    assert files == ["/tmp/ray/prom_metrics_service_discovery.json"]
    keep = [r for job in jobs for r in job.get("metric_relabel_configs", []) if r["action"] == "keep"]
    for name in exported_metric_names():
        assert all(re.fullmatch(r["regex"], name) for r in keep), name


# ------------------------------------------------------------------------------ Grafana
_PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "by", "without", "rate", "irate", "increase", "delta",
    "histogram_quantile", "clamp_min", "clamp_max", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "offset", "bool", "topk", "bottomk", "abs", "time", "vector", "scalar",
}


def exported_metric_names() -> set[str]:
    """What Prometheus sees for the code's metrics: Ray's ``ray_`` prefix plus sample suffixes."""
    out = set()
    for name in METRIC_NAMES.values():
        for suffix in ("", "_total", "_bucket", "_sum", "_count"):
            out.add(f"ray_{name}{suffix}")
    return out


def promql_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression (label matchers, ranges and groupings removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    found = re.findall(r"(?<![\w$.])([A-Za-z_:][\w:]*+)(?!\s*\()", expr)
    return {name for name in found if name not in _PROMQL_WORDS}


def dashboard_queries(dashboard: dict) -> list[str]:
    queries = []
    stack = list(dashboard.get("panels", []))
    while stack:
        panel = stack.pop()
        stack.extend(panel.get("panels", []))
        queries += [t["expr"] for t in panel.get("targets", []) if t.get("expr")]
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        text = query.get("query", "") if isinstance(query, dict) else ""
        if match := re.match(r"label_values\((\w+)\s*,", text):
            queries.append(match.group(1))
    return queries


def unknown_metrics(dashboard: dict) -> set[str]:
    used = set().union(*(promql_metrics(q) for q in dashboard_queries(dashboard)))
    return used - exported_metric_names()


def test_promql_parser_finds_metrics_not_labels_or_functions() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, level) (rate(ray_grand_stage_seconds_bucket'
            '{level=~"$level", stage="x"}[$__rate_interval]))) / clamp_min(up, 1e-9)')
    assert promql_metrics(expr) == {"ray_grand_stage_seconds_bucket", "up"}


def test_grafana_dashboard_uses_only_exported_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "grand.json").read_text())
    used = set().union(*(promql_metrics(q) for q in dashboard_queries(dashboard)))
    assert not unknown_metrics(dashboard)
    # Every metric the code exports is on the dashboard, and each required panel exists.
    assert {f"ray_{n}" for n in METRIC_NAMES.values()} <= {re.sub(r"_(bucket|sum|count)$", "", u) for u in used}
    titles = " | ".join(p["title"] for p in dashboard["panels"]).lower()
    for needle in ("images/s by level and stage", "shards committed and in flight", "failure rate by stage",
                   "llm attempts", "verify failures", "eta"):
        assert needle in titles, needle
    repeated = [p for p in dashboard["panels"] if p.get("repeat") == "level"]
    assert len(repeated) >= 2  # progress and ETA, one panel per level


def test_a_renamed_metric_is_reported_by_name() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "grand.json").read_text())
    broken = copy.deepcopy(dashboard)
    text = json.dumps(broken).replace("ray_grand_llm_attempts_total", "ray_grand_llm_tries_total")
    assert unknown_metrics(json.loads(text)) == {"ray_grand_llm_tries_total"}


def _scrape_ray_metrics(port: int, wanted: set[str], timeout: float = 120.0) -> set[str]:
    import time
    import urllib.request

    names: set[str] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(2)
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        except OSError:
            continue
        names = {line.split("{")[0].split(" ")[0] for line in body.splitlines() if line.startswith("ray_")}
        if all(any(n.startswith(f"ray_{w}") for n in names) for w in wanted):
            break
    return names


@pytest.mark.slow
def test_grafana_queries_match_what_ray_really_exports() -> None:
    """Record every metric once in a real Ray process and scrape Ray's Prometheus endpoint."""
    import socket

    import ray

    from grand_pipeline.metrics import PipelineMetrics, record_llm_attempt

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(num_cpus=1, include_dashboard=False, _metrics_export_port=port, log_to_driver=False)
    try:
        metrics = PipelineMetrics(ray_enabled=True)
        metrics.shards_planned({1: 5})
        metrics.stage_done(1, "tags", ok=3, failed=1, seconds=0.2)
        metrics.in_flight(1, 2)
        metrics.shard_committed(1)
        metrics.shard_failed(1)
        with metrics.active(3):
            record_llm_attempt(False, ["has 9 sentences; it needs 4 to 6"])
        scraped = _scrape_ray_metrics(port, set(METRIC_NAMES.values()))
    finally:
        ray.shutdown()
    dashboard = json.loads((DEPLOY / "grafana" / "grand.json").read_text())
    used = set().union(*(promql_metrics(q) for q in dashboard_queries(dashboard)))
    assert used, "no queries found"
    assert used <= scraped, f"on the dashboard but not exported by Ray: {sorted(used - scraped)}"
