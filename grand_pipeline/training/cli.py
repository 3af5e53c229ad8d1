"""``grand glamm``: the GLaMM companion's commands (a typer sub-app the main CLI mounts).

Like the main CLI, errors a user can cause print one line and exit with status 2; this module is
the only one of the companion that prints.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from grand_pipeline.cli_common import friendly

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="GLaMM companion: training data from GranD output, and GCG evaluation.",
)


@app.callback()
def _group() -> None:
    """GLaMM companion: training data from GranD output, and GCG evaluation."""


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
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """GCG metrics: AP50, mIoU (+ penalised), phrase recall (+ legacy), METEOR, CIDEr, BLEU, ROUGE-L."""
    from grand_pipeline.training.eval.gcg import EvalOptions, run_eval_gcg

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = EvalOptions(ap_score=ap_score, only_predicted=only_predicted)  # type: ignore[arg-type]
    report = run_eval_gcg(pred, gt, options=options, split=split, embedder=embedder, profile=profile)
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
