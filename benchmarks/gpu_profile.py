"""GPU-seconds per image of every Level-1 and Level-2 stage with the ``full`` profile's models.

Run with ``make bench-gpu`` (``python -m benchmarks.gpu_profile``) on a CUDA machine, or with
``--tiny`` on a CPU (the ``tiny`` profile: same backends and stages, tiny random weights).

What is measured, and why it is representative without downloading anything:
- Every full-profile model is built at FULL size (the checkpoint's architecture, see
  ``benchmarks/full_models.py``) with random weights, saved, and loaded through its backend's
  production loader. Random weights cost exactly the FLOPs of trained ones.
- Images are synthetic 1500x2250 RGB (SA-1B's size) with 20-50 drawn objects. Random detectors
  do not find real objects, so after the vote the objects are replaced by the drawn boxes (two
  candidate labels each) and floating objects are cleared: masks, region captions, depth and
  label assignment then see realistic counts. No SA-1B masks are given, so SAM segments every
  object (the worst case; with SA-1B masks most objects skip SAM).
- Each stage runs on micro-batches of the level's ``pools.levelN.micro_batch``; one untimed
  warm-up batch first (CUDA context, cuDNN autotuning, lazy init). The device is synchronised
  around each stage, so the time is the stage's own. GPU-seconds per image = stage wall time on
  one GPU / images. On CUDA, ``torch.profiler`` (CUDA activity) records each stage's timed
  batches: kernel seconds per image = the sum of its CUDA kernel (and memcpy/memset) time / images,
  and busy % = kernel / wall (the rest is host work: preprocessing, Python, launches). n/a on a CPU.
- Where spaCy's pipeline or the packaged MiniLM cannot be imported (a bare GPU machine), or with
  ``--force-stand-ins``, labelled stand-ins from ``benchmarks/stand_ins.py`` replace them (a regex
  noun-phrase splitter; a random full-size MiniLM-L6) and a ``# note: stand-in ...`` says so.
- The LLM (levels 3-4) runs only when vLLM is installed: random weights via
  ``load_format="dummy"``, one dense-caption-sized prompt per image. Otherwise a skip note, and a
  bound: a random Vicuna-13B-shaped Llama through transformers ``generate`` in fp16, batch 32,
  768 prompt + 200 new tokens (``--tiny``: a tiny Llama through the same code, labelled tiny).

Output (``print``; the benchmark is a CLI): see README "GPU profile benchmark" for the format.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grand_pipeline.config import GrandConfig, ModelSpec, load_config
from grand_pipeline.engine.runner import level_spec
from grand_pipeline.models.hub import ModelHub
from grand_pipeline.stage import ImageRecord

logger = logging.getLogger("benchmarks.gpu_profile")

HEIGHT, WIDTH = 1500, 2250
LABELS = ("cup", "table", "person", "car", "tree", "dog", "chair", "bottle", "window", "plant", "book", "lamp")
#: The stage after which drawn objects replace what the random detectors voted.
INJECT_AFTER = "vote"


def synthetic_image(
    rng: np.random.Generator, n_objects: int, height: int = HEIGHT, width: int = WIDTH
) -> tuple[np.ndarray, list[list[float]]]:
    """A smooth background with ``n_objects`` filled rectangles; returns (image, xyxy boxes)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(40, 200, size=3)
    k = width / WIDTH
    image = np.stack([base[c] + 40 * np.sin(xx / (k * (150 + 50 * c))) * np.cos(yy / (k * 210)) for c in range(3)], -1)
    boxes = []
    for _ in range(n_objects):
        w, h = k * rng.uniform(60, 700), k * rng.uniform(60, 600)
        x1, y1 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        image[int(y1) : int(y1 + h), int(x1) : int(x1 + w)] = rng.uniform(0, 255, size=3)
        boxes.append([round(x1, 2), round(y1, 2), round(x1 + w, 2), round(y1 + h, 2)])
    return np.clip(image, 0, 255).astype(np.uint8), boxes


def drawn_objects(boxes: list[list[float]], rng: np.random.Generator) -> list[dict[str, Any]]:
    objects = []
    for i, box in enumerate(boxes):
        labels = [str(v) for v in rng.choice(LABELS, size=2, replace=False)]
        objects.append({"id": i, "bbox": box, "labels": labels, "label": None, "score": 0.5, "attributes": [],
                        "depth": None, "segmentation": None, "segmentation_source": None,
                        "models": ["drawn"]})  # fmt: skip
    return objects


def specs_of(cfg: GrandConfig) -> list[tuple[str, ModelSpec]]:
    out = [(f"detectors.{k}", v) for k, v in cfg.models.detectors.items()]
    for field in dataclasses.fields(cfg.models):
        value = getattr(cfg.models, field.name)
        if isinstance(value, ModelSpec):
            out.append((field.name, value))
    return out


def full_size_config(workdir: Path, notes: list[str]) -> GrandConfig:
    """The full profile with every model replaced by a random full-size copy under ``workdir``."""
    from benchmarks.full_models import builder_for

    cfg = load_config("full")
    built: dict[tuple[str, str], Path] = {}
    for key, spec in specs_of(cfg):
        spec.device = "cuda" if spec.device in ("auto", "cpu", "") else spec.device
        builder = builder_for(spec)
        if builder is None:
            if spec.model.startswith(("hf:", "/")) and key.startswith("detectors."):
                del cfg.models.detectors[key.split(".", 1)[1]]
                notes.append(f"skipped {key} ({spec.backend}): no full-size random builder")
            continue
        name = builder.__name__
        if (name, spec.dtype) not in built:
            start = time.perf_counter()
            built[(name, spec.dtype)] = builder(workdir / f"{name}-{spec.dtype}", "cuda", getattr(torch, spec.dtype))
            torch.cuda.empty_cache()
            logger.info("built %s in %.1fs", name, time.perf_counter() - start)
        spec.model = str(built[(name, spec.dtype)])
        if spec.backend == "ultralytics":
            spec.options = {k: v for k, v in spec.options.items() if k != "text_model"}  # the folder's own
    # Random CLIP scores are near-uniform over ~1.5k names, below any real threshold: keep the
    # top_k tags anyway, so open-vocabulary detectors get a realistic number of queries (not the
    # COCO-80 fallback of an image without tags).
    cfg.models.tagger.options["threshold"] = 0.0
    cfg.level1.tag_threshold = 0.0
    # Keep the vote satisfiable whatever members remain; drawn objects replace its result anyway.
    cfg.level1.min_models = 1
    members = set(cfg.models.detectors)
    cfg.level1.vote_order = [m for m in cfg.level1.vote_order if m in members]
    cfg.level1.score_thresholds = {k: v for k, v in cfg.level1.score_thresholds.items() if k in members}
    cfg.level1.person.promote = {k: v for k, v in cfg.level1.person.promote.items() if k in members}
    cfg.level1.person.drop_unmatched_from = [m for m in cfg.level1.person.drop_unmatched_from if m in members]
    return cfg


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def cuda_kernel_seconds(events: Any) -> float:
    """Sum of the durations of the device-side (CUDA: kernels, memcpy, memset) events of a
    profile (``prof.events()``), in seconds. Host-side events are skipped."""
    device_type = torch.autograd.DeviceType.CUDA
    total_us = 0.0
    for event in events:
        if getattr(event, "device_type", None) != device_type:
            continue
        span = getattr(event, "time_range", None)
        us = span.elapsed_us() if span is not None else getattr(event, "self_device_time_total", 0.0)
        total_us += float(us or 0.0)
    return total_us / 1e6


class kernel_timer:  # noqa: N801  (used as a context manager, like torch.profiler.profile)
    """``torch.profiler`` (CUDA activity only, so the host side is not slowed) around a stage's
    batches; ``seconds`` is the sum of its CUDA kernel time after exit, None on a CPU."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.seconds: float | None = None
        self._prof: Any = None

    def __enter__(self) -> kernel_timer:
        if self.device == "cuda":
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CUDA])
            self._prof.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._prof is not None:
            self._prof.__exit__(*exc)
            if exc[0] is None:
                self.seconds = cuda_kernel_seconds(self._prof.events())


def profile_levels(
    cfg: GrandConfig, images: int, objects: tuple[int, int], device: str, seed: int, size: tuple[int, int]
) -> list[dict]:
    """Rows {level, stage, backends, load_s, seconds} for levels 1 and 2 over synthetic images."""
    rng = np.random.default_rng(seed)
    hub = ModelHub(cfg.models, cfg.plugins)
    rows: list[dict] = []
    stages: dict[int, list[Any]] = {}
    for level in (1, 2):
        stages[level] = []
        for cls in level_spec(level).stages:
            start = time.perf_counter()
            stage = cls(cfg, hub)
            _sync(device)
            backends = ",".join(sorted({b.backend for b in stage.backends.values()})) or "-"
            stages[level].append(stage)
            rows.append({"level": level, "stage": stage.name, "backends": backends,
                         "load_s": time.perf_counter() - start, "seconds": 0.0})  # fmt: skip
    counts = []

    def batch(n: int) -> list[ImageRecord]:
        out = []
        for _ in range(n):
            k = int(rng.integers(objects[0], objects[1] + 1))
            image, boxes = synthetic_image(rng, k, *size)
            record = ImageRecord(image_id=f"syn_{len(counts)}", shard_id="syn", width=size[1], height=size[0], image=image)
            record.fields["_drawn"] = drawn_objects(boxes, rng)
            counts.append(k)
            out.append(record)
        return out

    def run(records: list[ImageRecord], timed: bool) -> None:
        for level in (1, 2):
            micro = cfg.pool(level).micro_batch
            for stage in stages[level]:
                row = next(r for r in rows if r["level"] == level and r["stage"] == stage.name)
                _sync(device)
                with kernel_timer(device if timed else "cpu") as kernels:
                    start = time.perf_counter()
                    for lo in range(0, len(records), micro):
                        stage(records[lo : lo + micro])
                    _sync(device)
                    wall = time.perf_counter() - start
                if timed:
                    row["seconds"] += wall
                    if kernels.seconds is not None:
                        row["kernel_s"] = (row.get("kernel_s") or 0.0) + kernels.seconds
                if level == 1 and stage.name == INJECT_AFTER:
                    for record in records:
                        record.fields["objects"] = record.fields.pop("_drawn")
                        record.fields["floating_objects"] = []
        failed = [r for r in records if not r.ok]
        for record in failed:
            logger.warning("%s failed in %s: %s", record.image_id, record.error_stage, record.error)
        if failed:
            raise RuntimeError(f"{len(failed)} synthetic images failed; first: {failed[0].error}")

    run(batch(1), timed=False)  # warm-up
    counts.clear()
    run(batch(images), timed=True)
    for row in rows:
        row["per_image"] = row["seconds"] / images
        row["kernel_per_image"] = row["kernel_s"] / images if row.get("kernel_s") is not None else None
    rows.append({"objects": counts})
    return rows


def profile_llm(images: int, notes: list[str]) -> dict | None:
    """vLLM with dummy weights at full size, one dense-caption-sized prompt per image."""
    if importlib.util.find_spec("vllm") is None:
        notes.append("skipped llm (vllm): the vllm package is not installed")
        return None
    from grand_pipeline.models.roles import BACKENDS, ChatPrompt

    cfg = load_config("full")
    spec = dataclasses.replace(cfg.models.llm, options={**cfg.models.llm.options, "load_format": "dummy"})
    start = time.perf_counter()
    try:
        llm = BACKENDS["llm"].get("vllm")(spec)
    except Exception as exc:  # noqa: BLE001  (no tokenizer offline, engine errors: a note, not a crash)
        notes.append(f"skipped llm (vllm): {type(exc).__name__}: {exc}"[:300])
        return None
    load_s = time.perf_counter() - start
    scene = "Scene graph: " + "; ".join(f"object {i}: a {LABELS[i % len(LABELS)]} in the foreground" for i in range(40))
    prompts = [ChatPrompt([{"role": "user", "content": f"{scene}. Image {i}."}], max_new_tokens=200) for i in range(images)]
    start = time.perf_counter()
    llm.generate(prompts)
    return {"level": 3, "stage": "dense_caption", "backends": "vllm", "load_s": load_s,
            "per_image": (time.perf_counter() - start) / images}  # fmt: skip


#: lmsys/vicuna-13b-v1.5 (Llama-2-13B shape), the full profile's LLM.
VICUNA_13B = {"hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40,
              "intermediate_size": 13824, "vocab_size": 32000, "max_position_embeddings": 4096}  # fmt: skip
#: The same code path at smoke-test size (``--tiny``).
TINY_LLAMA = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
              "intermediate_size": 128, "vocab_size": 1000, "max_position_embeddings": 256}  # fmt: skip


def llm_bound(device: str, tiny: bool, seed: int = 0) -> str:
    """A bound for the LLM where vLLM is absent: a random Llama through transformers ``generate``
    (greedy, exactly ``new`` tokens), timed after one short warm-up; returns the labelled line.

    CUDA: Vicuna-13B's shape in fp16, batch 32, 768 prompt + 200 new tokens. ``tiny``: a tiny
    Llama through the same code on the CPU (fp32, batch 2, 16 + 8 tokens), labelled tiny."""
    from transformers import LlamaConfig, LlamaForCausalLM

    arch, dtype, batch, prompt, new = (
        (TINY_LLAMA, torch.float32, 2, 16, 8) if tiny else (VICUNA_13B, torch.float16, 32, 768, 200)
    )
    config = LlamaConfig(**arch, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype).eval()
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, arch["vocab_size"], (batch, prompt), generator=generator).to(device)
    mask = torch.ones_like(ids)

    def generate(model: Any, tokens: int) -> None:
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                                 do_sample=False, pad_token_id=0, eos_token_id=2)  # fmt: skip
        if out.shape[1] != prompt + tokens:
            raise RuntimeError(f"generate returned {out.shape[1] - prompt} new tokens, expected {tokens}")

    generate(model, min(new, 4))  # warm-up: CUDA context, cuBLAS handles, kernel selection
    _sync(device)
    start = time.perf_counter()
    generate(model, new)
    _sync(device)
    per_prompt = (time.perf_counter() - start) / batch
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    shape = "random tiny Llama (tiny, same code path)" if tiny else "random Vicuna-13B shape"
    precision = "fp32" if dtype == torch.float32 else "fp16"
    return (f"# llm bound (transformers generate, {precision}, {shape}, batch {batch}, {prompt}+{new} tokens): "
            f"{per_prompt:.2f} s/prompt")  # fmt: skip


def _kernel_cells(kernel: float | None, wall: float) -> str:
    if kernel is None:
        return f"{'n/a':>13}{'n/a':>8}"
    busy = 100.0 * kernel / wall if wall > 0 else 0.0
    return f"{kernel:>13.4f}{busy:>8.1f}"


def _sum_kernels(rows: list[dict]) -> float | None:
    values = [r.get("kernel_per_image") for r in rows]
    return None if any(v is None for v in values) or not values else sum(values)


def render(rows: list[dict], header: dict[str, str], notes: list[str], extra: list[str] | None = None) -> str:
    """The table documented in README ("GPU profile benchmark")."""
    lines = ["# gpu_profile " + " ".join(f"{k}={v}" for k, v in header.items())]
    lines.append(f"{'level':<6}{'stage':<16}{'backends':<34}{'load_s':>9}{'s_per_image':>13}"
                 f"{'kernel_s':>13}{'busy_%':>8}")  # fmt: skip
    total = 0.0
    for level in sorted({r["level"] for r in rows}):
        level_rows = [r for r in rows if r["level"] == level]
        for r in level_rows:
            lines.append(f"{level:<6}{r['stage']:<16}{r['backends'][:33]:<34}{r['load_s']:>9.2f}{r['per_image']:>13.4f}"
                         + _kernel_cells(r.get("kernel_per_image"), r["per_image"]))  # fmt: skip
        subtotal = sum(r["per_image"] for r in level_rows)
        total += subtotal
        lines.append(f"{level:<6}{'total':<16}{'':<34}{sum(r['load_s'] for r in level_rows):>9.2f}{subtotal:>13.4f}"
                     + _kernel_cells(_sum_kernels(level_rows), subtotal))  # fmt: skip
    lines.append(f"{'all':<6}{'total':<16}{'':<34}{sum(r['load_s'] for r in rows):>9.2f}{total:>13.4f}"
                 + _kernel_cells(_sum_kernels(rows), total))  # fmt: skip
    lines.extend(extra or [])
    lines.extend(f"# note: {n}" for n in notes)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny profile on the CPU (a smoke run of this script)")
    parser.add_argument("--images", type=int, default=0, help="timed images (default 16 full, 2 tiny)")
    parser.add_argument("--objects", type=int, nargs=2, default=(20, 50), metavar=("MIN", "MAX"))
    parser.add_argument("--workdir", default="", help="where the random full-size weights go (default: a temp dir)")
    parser.add_argument("--scale", type=float, default=0.0,
                        help="image side scale vs 1500x2250 (default 1 full, 0.25 tiny: the tiny OWLv2's "
                             "32 px processor blurs a full-size image for minutes on a CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force-stand-ins", action="store_true",
                        help="use the regex phrase splitter and the random full-size MiniLM even where spaCy "
                             "and the packaged MiniLM are installed")
    parser.add_argument("--no-llm-bound", action="store_true",
                        help="skip the transformers-generate LLM bound printed where vLLM is absent")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    notes: list[str] = []
    if args.tiny:
        device, cfg, images = "cpu", load_config("tiny"), args.images or 2
        name = f"cpu ({torch.get_num_threads()} threads)"
        notes.append("tiny profile: tiny random weights on the CPU; the numbers only show the script works")
    else:
        if not torch.cuda.is_available():
            print("gpu_profile: no CUDA device; run with --tiny for the CPU smoke run", file=sys.stderr)
            return 2
        device, images, name = "cuda", args.images or 16, torch.cuda.get_device_name(0)
    from benchmarks import stand_ins

    extra: list[str] = []
    with tempfile.TemporaryDirectory(prefix="grand-gpu-profile-", dir=args.workdir or None) as workdir:
        if not args.tiny:
            cfg = full_size_config(Path(workdir), notes)
        stand_in_notes = stand_ins.apply(cfg, force=args.force_stand_ins)
        started = time.perf_counter()
        scale = args.scale or (0.25 if args.tiny else 1.0)
        size = (round(HEIGHT * scale), round(WIDTH * scale))
        rows = profile_levels(cfg, images, tuple(args.objects), device, args.seed, size)
        counts = rows.pop()["objects"]
        for i, (backend, note) in enumerate(stand_in_notes):
            users = [f"{r['level']}/{r['stage']}" for r in rows if backend in r["backends"].split(",")]
            notes.insert(i, f"{note}; used by {', '.join(users) if users else 'no profiled stage (levels 3-4 use it)'}")
        vllm = importlib.util.find_spec("vllm") is not None
        if not args.tiny:
            llm = profile_llm(images, notes)
            if llm is not None:
                rows.append(llm)
        else:
            notes.append("skipped llm: levels 3-4 run vLLM, GPU only")
        if (args.tiny or not vllm) and not args.no_llm_bound:
            import gc

            gc.collect()  # the level models (hub <-> backend cycles) leave the GPU before the 13B model comes
            if device == "cuda":
                torch.cuda.empty_cache()
            try:
                extra.append(llm_bound(device, tiny=args.tiny, seed=args.seed))
            except Exception as exc:  # noqa: BLE001  (out of memory, transformers API drift: a note)
                notes.append(f"skipped llm bound: {type(exc).__name__}: {exc}"[:300])
    header = {"device": name.replace(" ", "_"), "mode": "tiny" if args.tiny else "full", "images": str(images),
              "size": f"{size[1]}x{size[0]}", "objects": f"{min(counts)}-{max(counts)}",
              "mean_objects": f"{np.mean(counts):.1f}", "wall_s": f"{time.perf_counter() - started:.1f}"}  # fmt: skip
    print(render(rows, header, notes, extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
