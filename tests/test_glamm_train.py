"""``grand glamm train`` / ``export-weights`` on the tiny GLaMM (CPU): config errors, local training,
exact resume after SIGKILL, DDP gradients, Ray Train to a moto S3 store, merged export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest
import torch
from skimage import data as skdata
from typer.testing import CliRunner

from grand_pipeline.cli import app
from grand_pipeline.config import ConfigError
from grand_pipeline.run_meta import RunMeta
from grand_pipeline.store import Store
from grand_pipeline.training.config import load_train_config
from grand_pipeline.training.train import checkpoint as ckpt_io
from grand_pipeline.training.train.log import KEYS, read_log
from grand_pipeline.training.train.loop import lr_factor
from tests.s3_server import S3Endpoint
from tests.test_export import commit
from tests.test_training_dataset import _row, _tar

REPO = Path(__file__).resolve().parents[1]
BUCKET = "grand-train"
SHARDS = {"sa_000000": ["sa_1", "sa_2"], "sa_000001": ["sa_3"], "sa_000002": ["sa_4"]}


def make_output(root: Path) -> Path:
    """Three committed level-3 shards (four good images) over source tars of real pixels."""
    coffee = skdata.coffee()
    out = root / "out"
    for shard, ids in SHARDS.items():
        _tar(root / "in" / f"{shard}.tar", [(i, coffee) for i in ids])
        commit(out, 3, shard, [_row(i, shard) for i in ids])
    RunMeta(Store(str(out))).write_run_meta("profile: lite\n", {"input": str(root / "in"), "config_hash": "abc"})
    return out


@pytest.fixture(scope="module")
def output(tmp_path_factory) -> Path:
    return make_output(tmp_path_factory.mktemp("train"))


def grand(*args: str):
    return CliRunner().invoke(app, list(args))


def one_line_error(result, needle: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("grand: error:") and needle in lines[0], result.output


def losses(out: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["ce"], r["bce"], r["dice"], r["lr"]) for r in read_log(str(out))]


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.lrr=0.1", "optim.lrr"),
        ("optim.lr=-1", "optim.lr"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("launch.executor=k8s", "launch.executor"),
        ("launch.workers=2", "launch.workers"),  # the local executor is one process
        ("data.max_length=3", "data.max_length"),
        ("data.convert.methods=[guess]", "data.convert.methods"),
        ("model.lora.dropout=2", "model.lora.dropout"),
        ("model.sizes=1", "model.sizes"),
        ("checkpoint_every=0", "checkpoint_every"),
    ],
)
def test_config_errors_name_the_dotted_key(override, key) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        load_train_config("tiny", [override])


def test_hash_follows_results_not_placement() -> None:
    base = load_train_config("tiny")
    assert load_train_config("tiny", ["checkpoint_every=7"]).content_hash() == base.content_hash()
    assert load_train_config("tiny", ["launch.torch_threads=2"]).content_hash() == base.content_hash()
    for changed in (["optim.lr=0.01"], ["data.seed=3"], ["seed=1"], ["model.lora.r=2"]):
        assert load_train_config("tiny", changed).content_hash() != base.content_hash(), changed
    assert load_train_config("tiny", steps=5).content_hash() != base.content_hash()
    full = load_train_config("full")
    assert (full.optim.lr, full.optim.betas, full.optim.grad_accum, full.launch.workers) == (3e-4, [0.9, 0.95], 10, 8)


def test_schedule_warms_up_then_decays_to_zero() -> None:
    got = [lr_factor(s, 2, 6) for s in range(6)]
    assert got == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25] and lr_factor(6, 2, 6) == 0.0


def test_cli_user_errors_are_one_line(output, tmp_path) -> None:
    one_line_error(grand("glamm", "train", "-o", str(output), "--set", "optim.lrr=1"), "optim.lrr")
    one_line_error(grand("glamm", "train", "-o", str(tmp_path / "empty")), "no level 3")
    one_line_error(grand("glamm", "train", "-o", str(output), "--executor", "ray", "--workers", "4"),
                   "launch.workers")  # four ranks, three shards: checked before Ray starts


def test_an_unmarked_checkpoint_does_not_count(tmp_path) -> None:
    uri = ckpt_io.save(str(tmp_path), 2, config_yaml="a: 1\n", config_hash="h", trainable={"w": torch.ones(2)},
                       optimizer={}, scheduler={}, rng=[ckpt_io.rng_state()], cursors=[ckpt_io.Cursor(1, 3)])
    (tmp_path / "glamm" / "checkpoints" / "step_5").mkdir()  # killed before its marker
    (tmp_path / "glamm" / "checkpoints" / "step_5" / "trainable.safetensors").write_bytes(b"half")
    assert ckpt_io.latest(str(tmp_path)) == uri
    loaded = ckpt_io.load(uri)
    assert loaded.step == 2 and loaded.cursors == [ckpt_io.Cursor(1, 3)] and torch.equal(loaded.trainable["w"], torch.ones(2))
    with pytest.raises(ConfigError, match="written by config h,"):
        ckpt_io.check_config(uri, loaded.config_hash, "other")


# ------------------------------------------------------------------------- local training
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Three local steps on the tiny config (checkpoints at 2 and 3)."""
    out = tmp_path_factory.mktemp("trained") / "out"
    make_output(out.parent)
    result = grand("glamm", "train", "-o", str(out), "--config", "tiny", "--steps", "3")
    assert result.exit_code == 0, result.output
    return out


def test_local_training_writes_log_and_checkpoints(trained) -> None:
    log = read_log(str(trained))
    assert [r["step"] for r in log] == [1, 2, 3] and all(tuple(r) == KEYS for r in log)
    assert all(r["loss"] > 0 and r["samples_per_s"] > 0 for r in log)
    assert sorted(ckpt_io.completed(str(trained))) == [2, 3]
    assert ckpt_io.latest(str(trained)).endswith("glamm/checkpoints/step_3")
    step3 = trained / "glamm" / "checkpoints" / "step_3"
    assert {p.name for p in step3.iterdir()} == {"trainable.safetensors", "optimizer.pt", "state.pt",
                                                  "config.yaml", "checkpoint.json"}
    # The same command again has nothing left to do; another config refuses the checkpoint.
    again = grand("glamm", "train", "-o", str(trained), "--steps", "3")
    assert again.exit_code == 0 and "nothing to do" in again.output
    one_line_error(grand("glamm", "train", "-o", str(trained), "--steps", "3", "--set", "optim.lr=0.01"),
                   "written by config")


def test_export_weights_writes_a_merged_state_dict_that_loads_back(trained, tmp_path) -> None:
    from grand_pipeline.training.model.builder import build_model
    from grand_pipeline.training.train.export import load_exported, restore

    result = grand("glamm", "export-weights", "-o", str(trained), "--to", str(tmp_path / "merged"))
    assert result.exit_code == 0, result.output
    merged, cfg = load_exported(str(tmp_path / "merged"))
    model, _ = restore(ckpt_io.load(ckpt_io.latest(str(trained))))
    want = model.merged_state_dict()
    assert merged.keys() == want.keys() and all(torch.equal(merged[k], want[k].cpu()) for k in want)
    untrained, _ = build_model(cfg.model)
    before = untrained.merged_state_dict()
    assert any(not torch.equal(before[k], merged[k]) for k in merged), "training changed nothing"
    one_line_error(grand("glamm", "export-weights", "-o", str(tmp_path / "none"), "--to", str(tmp_path / "x")),
                   "no complete checkpoint")


# ------------------------------------------------------------------------------ exact resume
def _train_cmd(out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "grand_pipeline.cli", "glamm", "train", "-o", str(out), "--config", "tiny",
            "--steps", str(steps), "--set", "checkpoint_every=2"]


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_uninterrupted_loss_sequence(tmp_path) -> None:
    steps = 6
    reference = make_output(tmp_path / "ref")
    subprocess.run(_train_cmd(reference, steps), cwd=REPO, check=True, capture_output=True, timeout=600)
    expected = losses(reference)
    assert [s[0] for s in expected] == list(range(1, steps + 1))

    out = make_output(tmp_path / "killed")
    proc = subprocess.Popen(_train_cmd(out, steps), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    marker = out / "glamm" / "checkpoints" / "step_2" / "checkpoint.json"
    deadline = time.monotonic() + 600
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists() and ckpt_io.latest(str(out)).endswith("step_2"), "killed too late or too early"
    assert len(read_log(str(out))) < steps
    subprocess.run(_train_cmd(out, steps), cwd=REPO, check=True, capture_output=True, timeout=600)
    assert losses(out) == expected
    assert not (out / "glamm" / "checkpoints" / "_staging").exists()


# ------------------------------------------------------------------------------- distributed
def _micro_batches(output: Path, n: int) -> list[dict]:
    from grand_pipeline.training.data.collate import Collator
    from grand_pipeline.training.data.dataset import GrandGlammDataset
    from grand_pipeline.training.model.builder import build_model

    cfg = load_train_config("tiny", ["data.task_weights={gcg: 1.0}"])
    _, tok = build_model(cfg.model)
    items = list(GrandGlammDataset(str(output), tok, cfg.data_config(), rank=0, world_size=1))[:n]
    return [Collator.for_tokenizer(tok)([item]) for item in items]


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _model_without_dropout():
    from grand_pipeline.training.model.builder import build_model
    from grand_pipeline.training.train.loop import seed_everything

    cfg = load_train_config("tiny")
    seed_everything(cfg.seed)
    model, _ = build_model(cfg.model)
    for module in model.modules():  # the ranks' dropout masks would differ from one process's
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.train()


def _ddp_rank(rank: int, world: int, port: int, batches: list[dict], result: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from grand_pipeline.training.train.loop import accumulate

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = _model_without_dropout()
        net = DistributedDataParallel(model, find_unused_parameters=True)
        accumulate(net, iter([batches[rank]]).__next__, 1, torch.device("cpu"))
        if rank == 0:
            torch.save(_grads(model), result)
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_equal_one_process_on_the_same_global_batch(output, tmp_path) -> None:
    from grand_pipeline.training.train.loop import accumulate
    from tests.s3_server import free_port

    batches = _micro_batches(output, 2)
    torch.set_num_threads(1)
    model = _model_without_dropout()
    accumulate(model, iter(batches).__next__, 2, torch.device("cpu"))  # one rank, two micro-batches
    single = _grads(model)
    result = str(tmp_path / "ddp.pt")
    # fork: the ranks inherit the imports (spawn would re-import torch and transformers twice)
    torch.multiprocessing.start_processes(_ddp_rank, args=(2, free_port(), batches, result), nprocs=2,
                                          start_method="fork")
    ddp = torch.load(result, weights_only=True)
    assert single.keys() == ddp.keys() and len(single) > 0
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-5, atol=1e-7, msg=name)


# -------------------------------------------------------------------------- Ray Train + S3
@pytest.fixture(scope="module")
def ray_s3(output):
    """moto S3 holding a copy of the output, and a 2-CPU local Ray that sees its endpoint."""
    import ray

    endpoint = S3Endpoint().start()
    saved = {k: os.environ.get(k) for k in endpoint.env()}
    os.environ.update(endpoint.env())
    try:
        client = boto3.client("s3", endpoint_url=endpoint.url)
        client.create_bucket(Bucket=BUCKET)
        for path in output.parent.rglob("*"):
            if path.is_file():
                client.upload_file(str(path), BUCKET, f"run/{path.relative_to(output.parent).as_posix()}")
        # Workers inherit the environment (endpoint, cache dir) of the node this process starts.
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield f"s3://{BUCKET}/run/out"
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        endpoint.stop()


def test_more_workers_than_the_ray_cluster_holds_is_one_line(ray_s3) -> None:
    one_line_error(grand("glamm", "train", "-o", ray_s3, "--executor", "ray", "--workers", "3"),
                   "the Ray cluster has 2")


@pytest.mark.slow
def test_ray_train_two_cpu_workers_checkpoint_to_s3(ray_s3) -> None:
    result = grand("glamm", "train", "-o", ray_s3, "--executor", "ray", "--workers", "2", "--steps", "2")
    assert result.exit_code == 0, result.output
    assert ckpt_io.latest(ray_s3) == f"{ray_s3}/glamm/checkpoints/step_2"
    loaded = ckpt_io.load(ckpt_io.latest(ray_s3))
    assert loaded.world_size == 2 and len(loaded.rng) == 2 and all(c.items > 0 for c in loaded.cursors)
    assert [r["step"] for r in read_log(ray_s3)] == [1, 2]
    assert json.loads(Store(ray_s3).fs.cat_file(f"{BUCKET}/run/out/glamm/checkpoints/step_2/checkpoint.json"))["step"] == 2


def test_infer_cli_writes_predictions_that_eval_gcg_scores(trained, tmp_path) -> None:
    """Done-means 6: the trained tiny checkpoint -> `grand glamm infer` -> `grand glamm eval-gcg`."""
    pred = tmp_path / "pred"
    result = grand("glamm", "infer", "-o", str(trained), "--to", str(pred), "--max-new-tokens", "8")
    assert result.exit_code == 0, result.output
    files = sorted(pred.glob("*.json"))
    assert files and all({"image_id", "caption", "phrases", "pred_masks"} <= json.loads(f.read_text()).keys()
                          for f in files)
    scored = grand("glamm", "eval-gcg", "--pred", str(pred), "--gt", str(trained), "--all-captions",
                   "--only-predicted", "--json")
    assert scored.exit_code == 0, scored.output
    report = json.loads(scored.stdout.strip().splitlines()[-1])
    assert report["predicted_images"] == len(files) and 0.0 <= report["mIoU"] <= 1.0


def test_prefetch_keeps_the_item_order_and_cursor_and_closes(output) -> None:
    """The prefetch thread hands out the same items with the same cursor positions, then stops."""
    from grand_pipeline.models.hf_common import tiny_tokenizer
    from grand_pipeline.training.data.dataset import GrandGlammDataset
    from grand_pipeline.training.data.tokens import SPECIAL_TOKENS
    from grand_pipeline.training.train.checkpoint import Cursor
    from grand_pipeline.training.train.stream import BatchStream

    cfg = load_train_config("tiny")
    tok = tiny_tokenizer(extra_special=SPECIAL_TOKENS)
    seen = []
    for prefetch in (0, 3):
        dataset = GrandGlammDataset(str(output), tok, cfg.data_config())
        stream = BatchStream(dataset, lambda items: items, 1, cursor=Cursor(), prefetch=prefetch)
        run = []
        for _ in range(5):  # more than an epoch of the 2-image output: crosses epochs
            (item,) = stream.next_batch()
            run.append((item.image_path, item.task, stream.cursor))
        threads = {t.name for t in threading.enumerate()}
        assert ("grand-prefetch" in threads) == (prefetch > 0)
        stream.close()
        assert "grand-prefetch" not in {t.name for t in threading.enumerate()}
        seen.append(run)
    assert seen[0] == seen[1]
