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
        "cluster-full.yaml", "cluster.yaml", "grafana/grand.json", "kuberay/models-pvc.yaml",
        "kuberay/raycluster-full.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob-full.yaml",
        "kuberay/rayjob-glamm-train.yaml", "kuberay/rayjob.yaml", "pools-full.yaml", "pools.yaml",
        "prometheus.yml", "runtime_env-full.yaml", "runtime_env.yaml",
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


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-full.yaml"])
def test_cluster_launcher_yaml_follows_rays_own_schema(name: str) -> None:
    import jsonschema  # a dependency of ray
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = load(name)
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


# ------------------------------------------------------------------------------ full profile
#: The claim of the weights volume (kuberay/models-pvc.yaml) that every full-profile pod mounts.
MODELS_CLAIM = "grand-models"
#: Usable memory (GiB, as nvidia-smi reports it) of the GPUs the full manifests ask for, by the
#: `nvidia.com/gpu.product` node label of NVIDIA's GPU feature discovery.
GPU_GIB = {"NVIDIA-L40S": 44.9, "NVIDIA-H100-80GB-HBM3": 79.6}
#: EC2 instance type -> (vCPUs, GPUs, GPU product) for the launcher's node types.
INSTANCES = {
    "g6e.4xlarge": (16, 1, "NVIDIA-L40S"),
    "g6e.8xlarge": (32, 1, "NVIDIA-L40S"),
    "p5.4xlarge": (16, 1, "NVIDIA-H100-80GB-HBM3"),
}
#: GPU memory in use by one actor of a vision level at full.yaml's batch sizes (GiB; README
#: "GPU memory per level pool", the estimates full.yaml's pools carry).
VISION_ACTOR_GIB = {1: 25.0, 2: 19.0}
#: Vicuna-13B-v1.5 is Llama-2-13B: parameters, layers, hidden size (no grouped-query attention).
VICUNA_13B = {"repo": "lmsys/vicuna-13b-v1.5", "params": 13.0e9, "layers": 40, "hidden": 5120}
#: Full-length sequences whose KV cache must fit beside the weights, so that the profile's
#: 64-prompt batches are not served a couple at a time.
MIN_KV_SEQUENCES = 8
DTYPE_BYTES = {"float16": 2, "bfloat16": 2}


def full_job() -> dict:
    return load("kuberay/rayjob-full.yaml")


def config_of(ctx: Any) -> Any:
    """The typed config of a parsed ``grand run``: profile, the deploy file it names, every --set."""
    params = ctx.params
    assert params["config"].startswith(IMAGE_REPO + "deploy/")
    local = DEPLOY.parent / params["config"][len(IMAGE_REPO):]
    return load_config(params["profile"], local, params["set_"] or [])


def full_config() -> Any:
    return config_of(parse_grand(full_job()["spec"]["entrypoint"]))


def spec_of(cfg: Any, key: str) -> Any:
    """The ModelSpec behind a hub key (``tagger``, ``detectors.owlv2``), as ``ModelHub.spec`` reads it."""
    head, _, member = key.partition(".")
    return cfg.models.detectors[member] if head == "detectors" else getattr(cfg.models, head)


def level_roles(cfg: Any) -> dict[int, list[str]]:
    """Hub keys of the models each level's stages load, from the stages' own ``models``."""
    import levels  # noqa: F401  (registers the built-in levels)
    from levels.base import LEVELS as SPECS
    from levels.level1.detect import DetectStage

    out: dict[int, list[str]] = {}
    for level in LEVELS:
        keys: list[str] = []
        for stage in SPECS.get(str(level)).stages:
            if stage is DetectStage:  # the ensemble is configuration: asked from the hub member by member
                keys += [f"detectors.{member}" for member in cfg.models.detectors]
            keys += list(stage.models)
        out[level] = list(dict.fromkeys(keys))
    return out


def weight_sources(spec: Any) -> list[str]:
    """``model`` plus options that name weights too (e.g. YOLO-World's ``text_model``); packaged
    weights (``package:``, empty: inside the image) are not sources to place."""
    values = [spec.model] + [v for v in spec.options.values() if isinstance(v, str)]
    return [v for v in values if v.startswith(("hf:", "tiny:", "/", "~", ".")) or "://" in v]


def pip_requirements(env: dict) -> dict[str, Any]:
    """Package name -> requirement of everything a runtime_env installs (pip or uv)."""
    from packaging.requirements import Requirement

    assert not env.get("conda"), "a conda runtime_env is not checked here"
    out = {}
    for name in ("pip", "uv"):
        value = env.get(name) or []
        packages = value.get("packages", []) if isinstance(value, dict) else value
        assert isinstance(packages, list), f"{name}: list the packages (a requirements file is not checked)"
        for line in packages:
            req = Requirement(line)
            out[req.name.lower()] = req
    return out


def actor_env(job_env: dict, pool_env: dict) -> dict:
    """What a pool's actors run with: Ray merges the actor's runtime_env over the job's (fields
    replaced, env_vars merged key by key)."""
    from ray.runtime_env.runtime_env import _merge_runtime_env

    return _merge_runtime_env(job_env, pool_env, override=True)


def pod_templates(spec: dict) -> dict[str, dict]:
    workers = {g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]}
    return {"head": spec["headGroupSpec"]["template"], **workers}


def kuberay_nodes(spec: dict) -> dict[str, dict]:
    """Worker group -> what one pod gives Ray (KubeRay derives CPU/GPU from the container limits)."""
    nodes = {}
    for group in spec["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        # Guaranteed QoS: what Ray is told (the limits) is what the pod really holds.
        assert container["resources"]["requests"] == limits, group["groupName"]
        params = group["rayStartParams"]
        assert "num-gpus" not in params and "num-cpus" not in params, "KubeRay takes them from the limits"
        resources = {"CPU": float(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0))}
        resources |= _group_resources(params)
        product = group["template"]["spec"].get("nodeSelector", {}).get("nvidia.com/gpu.product")
        assert not resources["GPU"] or product in GPU_GIB, (group["groupName"], product)
        gpu_gib = GPU_GIB.get(product, 0.0)
        nodes[group["groupName"]] = {"resources": resources, "max": group["maxReplicas"], "gpu_gib": gpu_gib}
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    return nodes


def launcher_nodes(launcher: dict) -> dict[str, dict]:
    nodes = {}
    for name, node_type in launcher["available_node_types"].items():
        if name == launcher["head_node_type"]:
            continue
        vcpus, gpus, product = INSTANCES[node_type["node_config"]["InstanceType"]]
        resources = node_type["resources"]
        # The autoscaler plans with these numbers: they must be the machine's.
        assert (resources["CPU"], resources["GPU"]) == (vcpus, gpus), name
        nodes[name] = {"resources": resources, "max": node_type["max_workers"], "gpu_gib": GPU_GIB[product]}
    assert sum(n["max"] for n in nodes.values()) <= launcher["max_workers"]
    return nodes


def check_gpu_memory(cfg: Any, level: int, keys: list[str], gpu_gib: float) -> None:
    pool = cfg.pool(level)
    llms = [spec_of(cfg, k) for k in keys if spec_of(cfg, k).backend == "vllm"]
    if not llms:
        per_gpu = max(1, int(1 // pool.num_gpus))  # actors that share one GPU
        assert per_gpu * VISION_ACTOR_GIB[level] <= gpu_gib, (level, per_gpu, gpu_gib)
        return
    (spec,) = llms
    from grand_pipeline.models import weights

    assert weights.parse_hf(spec.model)[0] == VICUNA_13B["repo"], "sized for Vicuna-13B: update VICUNA_13B"
    options = spec.options
    tp = int(options.get("tensor_parallel_size", 1))
    # vLLM pre-allocates gpu_memory_utilization of every GPU it sees: whole GPUs, one per TP rank.
    assert pool.num_gpus == tp, (level, pool.num_gpus, tp)
    budget = float(options.get("gpu_memory_utilization", 0.9)) * gpu_gib * tp
    weights_gib = VICUNA_13B["params"] * DTYPE_BYTES[spec.dtype] / 2**30
    kv_per_token = 2 * VICUNA_13B["layers"] * VICUNA_13B["hidden"] * DTYPE_BYTES[spec.dtype]  # K and V
    kv_per_sequence = kv_per_token * int(options["max_model_len"]) / 2**30
    need = weights_gib + MIN_KV_SEQUENCES * kv_per_sequence
    assert budget >= need, f"level {level}: {budget:.1f} GiB for vLLM < {need:.1f} GiB (weights + KV cache)"


def check_full_placement(nodes: dict[str, dict], cfg: Any) -> None:
    """Each level's pool lands on exactly one GPU group that can hold it, at the pool's size."""
    roles = level_roles(cfg)
    levels_of: dict[str, list[int]] = {}
    for level in LEVELS:
        pool, name = cfg.pool(level), f"grand_level{level}"
        assert pool.resources == {name: 1.0}, level
        assert pool.num_gpus > 0, f"level {level} runs full-size models: its pool must ask for a GPU"
        groups = [g for g, node in nodes.items() if name in node["resources"]]
        assert len(groups) == 1, (name, groups)
        node = nodes[groups[0]]
        res = node["resources"]
        assert res["GPU"] >= pool.num_gpus, (level, groups[0])
        per_node = min(res["GPU"] // pool.num_gpus, res["CPU"] // pool.num_cpus, res[name] // 1.0)
        assert per_node >= 1, (level, groups[0])
        assert pool.num_actors <= per_node * node["max"], (level, pool.num_actors, per_node, node["max"])
        check_gpu_memory(cfg, level, roles[level], node["gpu_gib"])
        levels_of.setdefault(groups[0], []).append(level)
    # Levels that share a group (3 and 4) run at the same time: all their actors must fit at once.
    for group, levels in levels_of.items():
        node = nodes[group]
        for field_name, res in (("num_gpus", "GPU"), ("num_cpus", "CPU")):
            wanted = sum(cfg.pool(lvl).num_actors * getattr(cfg.pool(lvl), field_name) for lvl in levels)
            assert wanted <= node["resources"][res] * node["max"], (group, res, wanted)
    assert {g for g, n in nodes.items() if n["resources"].get("GPU")} == set(levels_of), "an unused GPU group"


def test_full_rayjob_runs_the_full_profile_with_a_valid_config() -> None:
    job = full_job()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    ctx = parse_grand(job["spec"]["entrypoint"])
    params = ctx.params
    assert ctx.info_name == "run" and params["profile"] == "full" and params["levels"] == "1-4"
    assert params["input"].startswith("s3://") and params["output"].startswith("s3://")
    lite = parse_grand(load("kuberay/rayjob.yaml")["spec"]["entrypoint"]).params
    assert params["output"] != lite["output"], "full and lite outputs have different config hashes"
    assert params["config"] == IMAGE_REPO + "deploy/pools-full.yaml"
    cfg = config_of(ctx)  # typed validation of the profile + pools-full.yaml + every --set
    assert cfg.profile == "full" and cfg.engine.executor == "ray" and cfg.engine.ray_address == "auto"
    # Every --set places a model's weights: a real key, whose value reached the typed config.
    assert params["set_"]
    for item in params["set_"]:
        key, _, value = item.partition("=")
        match = re.fullmatch(r"models\.((?:detectors\.)?\w+)\.model", key)
        assert match and value.startswith("s3://"), item
        assert spec_of(cfg, match.group(1)).model == value
    # The brief's wording is not a key: the loader names the bad dotted key instead of ignoring it.
    from grand_pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"models\.detectors\.rtdetr\.weights: unknown key"):
        load_config("full", DEPLOY / "pools-full.yaml", ["models.detectors.rtdetr.weights=s3://b/rtdetr-x"])


def test_full_runtime_envs_use_only_ray_fields() -> None:
    cfg = full_config()
    check_runtime_env(load("runtime_env-full.yaml"))
    check_runtime_env(yaml.safe_load(full_job()["spec"]["runtimeEnvYAML"]))
    for level in LEVELS:
        check_runtime_env(cfg.pool(level).runtime_env)


def test_vllm_is_installed_only_for_the_llm_levels() -> None:
    cfg = full_config()
    roles = level_roles(cfg)
    # Which levels load the vLLM engine comes from the stages, not from this test.
    needs = {lvl for lvl, keys in roles.items() if any(spec_of(cfg, k).backend == "vllm" for k in keys)}
    assert needs == {3, 4}
    job_envs = {
        "kuberay/rayjob-full.yaml": yaml.safe_load(full_job()["spec"]["runtimeEnvYAML"]),
        "runtime_env-full.yaml": load("runtime_env-full.yaml"),
    }
    for where, job_env in job_envs.items():
        assert "vllm" not in json.dumps(job_env).lower(), f"{where}: vllm belongs to the level-3/4 pools only"
        for level in LEVELS:
            env = actor_env(job_env, cfg.pool(level).runtime_env)
            check_runtime_env(env)
            packages = pip_requirements(env)
            assert ("vllm" in packages) == (level in needs), (where, level, sorted(packages))
            if level in needs:
                (pin,) = packages["vllm"].specifier
                # Pinned, and new enough for llm_vllm.py (StructuredOutputsParams, vLLM >= 0.12).
                assert pin.operator == "==" and tuple(map(int, pin.version.split(".")[:2])) >= (0, 12)
                # The job's env_vars still reach the LLM actors: merged, not replaced.
                assert job_env.get("env_vars", {}).items() <= env.get("env_vars", {}).items()
            else:
                assert "vllm" not in json.dumps(env).lower(), (where, level)
    # Nothing else brings vllm in: not the images, the pods' env, nor the launcher's node setup.
    for spec in (load("kuberay/raycluster-full.yaml")["spec"], full_job()["spec"]["rayClusterSpec"]):
        for name, template in pod_templates(spec).items():
            assert "vllm" not in json.dumps(template["spec"]["containers"]).lower(), name
    launcher = load("cluster-full.yaml")
    setup = launcher["setup_commands"] + launcher["initialization_commands"] + [launcher["docker"]["image"]]
    assert not [c for c in setup if "vllm" in c.lower()]
    for node_type in launcher["available_node_types"].values():
        assert "setup_commands" not in json.dumps(node_type).lower()  # no per-group install either


def test_full_pools_land_on_gpu_groups_that_hold_them() -> None:
    cfg = full_config()
    assert cfg.pools == load_config("full", DEPLOY / "pools-full.yaml").pools  # --set changes weights only
    cluster = load("kuberay/raycluster-full.yaml")["spec"]
    assert cluster == full_job()["spec"]["rayClusterSpec"], "the RayJob's cluster must match raycluster-full.yaml"
    check_full_placement(kuberay_nodes(cluster), cfg)
    launcher = load("cluster-full.yaml")
    assert launcher["available_node_types"][launcher["head_node_type"]]["resources"] == {"CPU": 0}
    check_full_placement(launcher_nodes(launcher), cfg)


def test_full_placement_check_catches_a_misfit() -> None:
    cfg = full_config()
    nodes = kuberay_nodes(load("kuberay/raycluster-full.yaml")["spec"])
    small = copy.deepcopy(nodes)
    small["llm-gpu"]["gpu_gib"] = GPU_GIB["NVIDIA-L40S"]  # Vicuna-13B + KV cache does not fit 48 GB
    with pytest.raises(AssertionError, match="level 3"):
        check_full_placement(small, cfg)
    no_gpu = copy.deepcopy(nodes)
    no_gpu["level2-gpu"]["resources"]["GPU"] = 0.0
    with pytest.raises(AssertionError):
        check_full_placement(no_gpu, cfg)
    few = copy.deepcopy(nodes)
    few["llm-gpu"]["max"] = 4  # 4 + 4 LLM actors, one GPU each, on 4 nodes
    with pytest.raises(AssertionError, match="llm-gpu"):
        check_full_placement(few, cfg)


def _under(path: str, mount: str) -> bool:
    from pathlib import PurePosixPath

    return PurePosixPath(path).is_absolute() and PurePosixPath(path).is_relative_to(mount)


def check_weight_places(cfg: Any, env: dict[str, str], mount: str, where: str, monkeypatch: Any) -> None:
    """Every weight source of every level is s3:// or lies on the volume mounted at ``mount``."""
    from grand_pipeline.models import weights

    assert _under(env["HF_HUB_CACHE"], mount), f"{where}: HF_HUB_CACHE is not on the models volume"
    assert _under(env["GRAND_CACHE_DIR"], mount), f"{where}: GRAND_CACHE_DIR is not on the models volume"
    monkeypatch.setenv("GRAND_CACHE_DIR", env["GRAND_CACHE_DIR"])
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s3 = False
    for level, keys in level_roles(cfg).items():
        for key in keys:
            for source in weight_sources(spec_of(cfg, key)):
                what = f"{where}: level {level} models.{key}: {source}"
                if source.startswith("hf:"):
                    # Pinned to a commit: the volume holds exactly that snapshot, read without the hub.
                    assert re.fullmatch(r"[0-9a-f]{40}", weights.parse_hf(source)[1]), what
                elif source.startswith("s3://"):
                    s3 = True
                    # Copied once into GRAND_CACHE_DIR, i.e. onto the shared volume.
                    assert _under(str(weights._remote_target(source)), mount), what
                else:
                    assert _under(source, mount), f"{what} is neither s3:// nor on the models volume"
    # weights._resolve_remote refuses to copy an s3:// source while HF_HUB_OFFLINE is set.
    assert not (s3 and weights.offline()), f"{where}: HF_HUB_OFFLINE is set but weights come from s3://"


def test_full_weights_come_from_s3_or_the_models_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = full_config()
    claim = load("kuberay/models-pvc.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and claim["metadata"]["name"] == MODELS_CLAIM
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "every pod of every group mounts it at once"
    job_env = yaml.safe_load(full_job()["spec"]["runtimeEnvYAML"]).get("env_vars", {})
    # The driver checks every source on the head before any actor starts: the head mounts it too.
    for name, template in pod_templates(load("kuberay/raycluster-full.yaml")["spec"]).items():
        (container,) = template["spec"]["containers"]
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        mounts = [m["mountPath"] for m in container["volumeMounts"]
                  if volumes[m["name"]].get("persistentVolumeClaim", {}).get("claimName") == MODELS_CLAIM]
        assert len(mounts) == 1, f"{name}: the models claim is not mounted once"
        env = {e["name"]: e["value"] for e in container["env"]} | job_env  # runtime_env wins over the pod
        with monkeypatch.context() as patch:
            check_weight_places(cfg, env, mounts[0], name, patch)
    # Launcher: the host's shared file system, bind-mounted into the container, named by runtime_env-full.yaml.
    launcher = load("cluster-full.yaml")
    binds = [o.split()[1].split(":") for o in launcher["docker"]["run_options"] if o.startswith("-v ")]
    assert len(binds) == 1
    host, mount = binds[0][:2]
    assert any(re.search(rf"mount .* {re.escape(host)}\)?$", c) for c in launcher["initialization_commands"])
    with monkeypatch.context() as patch:
        check_weight_places(cfg, load("runtime_env-full.yaml")["env_vars"], mount, "cluster-full.yaml", patch)


def test_weight_place_check_refuses_a_path_off_the_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"HF_HUB_CACHE": "/models/hf-hub", "GRAND_CACHE_DIR": "/models/grand"}
    cfg = load_config("full", DEPLOY / "pools-full.yaml", ["models.detectors.rtdetr.model=/opt/rtdetr-x"])
    with pytest.raises(AssertionError, match="rtdetr"):
        check_weight_places(cfg, env, "/models", "test", monkeypatch)
    cfg = load_config("full", DEPLOY / "pools-full.yaml", ["models.llm.model=hf:lmsys/vicuna-13b-v1.5@main"])
    with pytest.raises(AssertionError, match="llm"):
        check_weight_places(cfg, env, "/models", "test", monkeypatch)
    cfg = load_config("full", DEPLOY / "pools-full.yaml", ["models.llm.model=s3://b/vicuna"])
    with pytest.raises(AssertionError, match="HF_HUB_OFFLINE"):
        check_weight_places(cfg, env | {"HF_HUB_OFFLINE": "1"}, "/models", "test", monkeypatch)


def test_full_cluster_keeps_token_auth_and_the_private_dashboard() -> None:
    lite, full = load("kuberay/raycluster.yaml")["spec"], load("kuberay/raycluster-full.yaml")["spec"]
    for spec in (full, full_job()["spec"]["rayClusterSpec"]):
        assert spec["authOptions"] == lite["authOptions"] == {"mode": "token"}
        assert spec["rayVersion"] == lite["rayVersion"]
        # num-cpus 0 (no pool actor on the head), the dashboard on the pod network only, metrics port.
        assert spec["headGroupSpec"]["rayStartParams"] == lite["headGroupSpec"]["rayStartParams"]
        (head,) = spec["headGroupSpec"]["template"]["spec"]["containers"]
        (lite_head,) = lite["headGroupSpec"]["template"]["spec"]["containers"]
        assert head["ports"] == lite_head["ports"]
        assert "nvidia.com/gpu" not in head["resources"]["limits"]
        for group in spec["workerGroupSpecs"]:
            assert group["rayStartParams"]["metrics-export-port"] == "8080"
    lite_launcher, full_launcher = load("cluster.yaml"), load("cluster-full.yaml")
    for key in ("head_start_ray_commands", "worker_start_ray_commands", "file_mounts", "auth", "provider"):
        assert full_launcher[key] == lite_launcher[key], key
    assert "--dashboard-host=127.0.0.1" in " ".join(full_launcher["head_start_ray_commands"])
    assert any("RAY_AUTH_MODE=token" in c for c in full_launcher["setup_commands"])
    assert full_launcher["docker"]["image"] == lite_launcher["docker"]["image"]


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

    from grand_pipeline.metrics import PipelineMetrics

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
        metrics.llm_attempt(3, False, ["sentences"])
        scraped = _scrape_ray_metrics(port, set(METRIC_NAMES.values()))
    finally:
        ray.shutdown()
    dashboard = json.loads((DEPLOY / "grafana" / "grand.json").read_text())
    used = set().union(*(promql_metrics(q) for q in dashboard_queries(dashboard)))
    assert used, "no queries found"
    assert used <= scraped, f"on the dashboard but not exported by Ray: {sorted(used - scraped)}"
