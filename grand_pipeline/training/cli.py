"""``grand glamm``: the GLaMM companion's commands (a typer sub-app the main CLI mounts).

Commands: ``train`` (resumes by default), ``export-weights``, ``eval-gcg``. Like the main CLI,
errors a user can cause print one line and exit with status 2; this module is the only one of the
companion that prints (and draws the progress bar).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from grand_pipeline.cli_common import friendly

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="GLaMM companion: training, weights export and GCG evaluation on GranD output.",
)


@app.callback()
def _group() -> None:
    """GLaMM companion: training, weights export and GCG evaluation on GranD output."""


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _print_table(report: dict[str, Any]) -> None:
    from grand_pipeline.training.eval.gcg import HEADLINE

    typer.echo(f"{'metric':<16}{'value':>10}")
    for key in HEADLINE:
        typer.echo(f"{key:<16}{_fmt(report.get(key)):>10}")
    typer.echo(
        f"images {report['images']} ({report['predicted_images']} predicted, "
        f"{report['missing_predictions']} missing, {report['unknown_predictions']} unknown ids); "
        f"GT phrases {report['phrases']}; TP {report['true_positives']['assignment']} "
        f"(legacy {report['true_positives']['legacy']})"
    )
    if report["mismatch_images"]:
        typer.echo(f"phrase/mask count mismatches: {report['mismatch_images']} images (not scored "
                   f"for recall; listed in --json / --report)")
    for name, counts in (("skipped files", report["skips"]), ("warnings", report["warnings"])):
        if counts:
            typer.echo(f"{name}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


@app.command("eval-gcg")
@friendly
def eval_gcg(
    pred: Annotated[Path, typer.Option("--pred", help="Folder of <image_id>.json predictions "
                                       "({image_id, caption, phrases, pred_masks[, scores]}).")],
    gt: Annotated[str, typer.Option("--gt", help="Output URI of a committed run, or a folder with "
                                    "*_gcg_coco_mask_gt.json + *_gcg_coco_caption_gt.json.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    report_file: Annotated[Path | None, typer.Option("--report", help="Also write the JSON report here.")] = None,
    ap_score: Annotated[str, typer.Option(help="AP ranking: 'file' (per-mask scores) or 'constant' "
                                          "(all 1.0 as the reference; AP then depends on order).")] = "file",
    embedder: Annotated[str, typer.Option(help="Phrase embedder: 'minilm' (the profile's text "
                                          "embedder) or a local BERT name/folder, e.g. bert-base-uncased.")] = "minilm",
    profile: Annotated[str, typer.Option(help="Profile whose text_embedder 'minilm' uses.")] = "lite",
    split: Annotated[str | None, typer.Option(help="GT file prefix (val/test) when a folder has several.")] = None,
    only_predicted: Annotated[bool, typer.Option(help="Evaluate only GT images that have a prediction.")] = False,
    only_verified: Annotated[bool, typer.Option("--only-verified/--all-captions", help="GT from a committed "
                                                "output: verified dense captions only (as the exports).")] = True,
    methods: Annotated[str, typer.Option(help="GT grounding methods kept: exact,embedding[,noun].")]
        = "exact,embedding",
    no_floating: Annotated[bool, typer.Option("--no-floating", help="GT: drop phrases on floating objects.")]
        = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """GCG metrics: AP50, mIoU (+ penalised), phrase recall (+ legacy), METEOR, CIDEr, BLEU, ROUGE-L."""
    from grand_pipeline.training.eval.gcg import EvalOptions, run_eval_gcg

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = EvalOptions(ap_score=ap_score, only_predicted=only_predicted)  # type: ignore[arg-type]
    from grand_pipeline.training.data.convert import ConvertOptions

    convert = ConvertOptions(
        methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
        only_verified=only_verified,
        floating=not no_floating,
    )
    report = run_eval_gcg(pred, gt, options=options, split=split, embedder=embedder, profile=profile,
                          convert=convert)
    if report_file is not None:
        try:
            report_file.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            from grand_pipeline.training.eval.io import EvalInputError

            raise EvalInputError(f"--report {report_file}: {exc.strerror or exc}") from None
    if as_json:
        typer.echo(json.dumps(report, sort_keys=True))
    else:
        _print_table(report)


def _setup_logging(verbose: bool) -> str:
    """Configure this process's logging; returns the level name, which ``train`` hands to its
    Ray Train workers (they do not share this process's logging)."""
    level = "INFO" if verbose else "WARNING"
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return level


@app.command()
@friendly
def train(
    output: Annotated[str, typer.Option("--output", "-o", help="A committed output (level 3+), local or URI; "
                                        "checkpoints and the log go to OUTPUT/glamm/.")],
    config: Annotated[str, typer.Option("--config", help="Training profile: tiny or full.")] = "tiny",
    steps: Annotated[int | None, typer.Option(help="Total optimiser steps (optim.total_steps).")] = None,
    executor: Annotated[str | None, typer.Option(help="local (in-process) or ray (Ray Train).")] = None,
    workers: Annotated[int | None, typer.Option(help="Data-parallel workers (launch.workers).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="dotted.key=value override.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train GLaMM on a committed output; rerunning the same command resumes from the last checkpoint."""
    from tqdm import tqdm

    from grand_pipeline.training.config import load_train_config
    from grand_pipeline.training.train.launch import open_launcher

    log_level = _setup_logging(verbose)
    cfg = load_train_config(config, set_ or [], steps=steps, executor=executor, workers=workers)
    total = cfg.optim.total_steps
    with open_launcher(cfg, output, log_level) as launcher:  # every check passed: the run can start
        start = launcher.preflight.start_step
        if start:
            typer.echo(f"resuming from step {start} of {total} ({launcher.preflight.checkpoint})", err=True)
        with tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr) as bar:

            def on_step(record: dict[str, Any]) -> None:
                bar.update(record["step"] - bar.n)
                bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.2f}")

            result = launcher.run(on_step)
    last = result.last
    if last is None:
        typer.echo(f"nothing to do: already at step {total}")
    else:
        typer.echo(f"step {last['step']}/{total}: loss {last['loss']:.4f}; checkpoint {result.checkpoint}")


@app.command("export-weights")
@friendly
def export_weights(
    output: Annotated[str, typer.Option("--output", "-o", help="The output the model was trained on.")],
    to: Annotated[str, typer.Option("--to", help="Folder for model.safetensors + config.yaml.")],
    checkpoint: Annotated[str | None, typer.Option(help="A checkpoint folder (default: the newest).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Merged weights (LoRA folded in) of a training checkpoint, as safetensors + config."""
    from grand_pipeline.training.train.export import export_weights as export

    _setup_logging(verbose)
    done = export(output, to, checkpoint)
    typer.echo(f"wrote {done.tensors} tensors of {done.checkpoint} (step {done.step}) to {done.uri}")


@app.command()
@friendly
def infer(
    to: Annotated[str, typer.Option("--to", help="Folder for one <image_id>.json prediction per image.")],
    checkpoint: Annotated[str | None, typer.Option(help="A checkpoint or export-weights folder "
                                                   "(default: the newest under --output).")] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="A committed output: its images "
                                               "(from their source shards) and its checkpoints.")] = None,
    images: Annotated[str | None, typer.Option("--images", help="A folder of images instead.")] = None,
    image: Annotated[list[str] | None, typer.Option("--image", help="Only these image ids (repeatable).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Generation budget per image.")] = 512,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """GCG generation (KV-cached): caption, phrases and one mask per [SEG], in eval-gcg's format."""
    from grand_pipeline.training.infer import infer_command

    _setup_logging(verbose)
    written = infer_command(checkpoint, output, images, list(image or []), to, max_new_tokens)
    typer.echo(f"wrote {written} prediction file(s) to {to}")
