"""The ``grand`` command line. The only module that prints or draws progress bars.

Errors a user can cause (bad path, bad config, unknown model, a missing level N-1) print one
line and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Annotated, Any

import typer

from grand_pipeline.cli_common import friendly

#: Shard rows `grand status` prints before it lists only the unfinished ones.
_MATRIX_MARK = {"committed": "x", "partial": "~"}  # x: every unit, ~: some units, .: none
_MATRIX_ROWS = 50

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Build GranD annotations.")


def _setup_logging(verbose: bool) -> str:
    """Configure this process's logging; returns the level name, which the run hands to its
    Ray actors (they do not share this process's logging)."""
    level = "INFO" if verbose else "WARNING"
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return level


def parse_levels(level: int | None, levels: str | None) -> list[int]:
    from grand_pipeline.config import ConfigError
    from grand_pipeline.engine.runner import level_spec
    from grand_pipeline.registry import UnknownNameError

    if level is not None and levels is not None:
        raise ConfigError("--level and --levels: give one of them")
    if level is not None:
        wanted = [level]
    else:
        text = levels or "1"
        lo, _, hi = text.partition("-")
        try:
            start, end = int(lo), int(hi or lo)
        except ValueError:
            raise ConfigError(f"--levels {text!r}: expected N or N-M, e.g. 1-4") from None
        if start > end:
            raise ConfigError(f"--levels {text!r}: the range must go up (N-M with N <= M), e.g. 1-4")
        wanted = list(range(start, end + 1))
    for number in wanted:
        if number < 1:
            raise ConfigError(f"level {number} is not available: levels start at 1")
        try:
            level_spec(number)
        except UnknownNameError as exc:
            raise ConfigError(f"level {number} is not available ({exc})") from None
    return wanted


@app.command()
@friendly
def run(
    input: Annotated[str, typer.Option("--input", "-i", help="SA-1B tar, folder of tars/images, or URI.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Output folder or URI.")],
    level: Annotated[int | None, typer.Option(help="Run only this level (N-1 must be committed).")] = None,
    levels: Annotated[str | None, typer.Option(help="Level range, e.g. 1-4.")] = None,
    profile: Annotated[str, typer.Option(help="lite, full or tiny.")] = "lite",
    config: Annotated[str | None, typer.Option(help="YAML merged over the profile.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="dotted.key=value override.")] = None,
    executor: Annotated[str | None, typer.Option(help="ray or local (default from config).")] = None,
    mode: Annotated[str, typer.Option(help="resume (default) or overwrite.")] = "resume",
    shards: Annotated[str | None, typer.Option(help="Glob over shard ids.")] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many shards.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run levels over the input shards; committed (level, shard) pairs are skipped."""
    from grand_pipeline.config import ConfigError, load_config
    from grand_pipeline.engine import driver
    from grand_pipeline.engine.runner import StartupFailed

    log_level = _setup_logging(verbose)
    if mode not in ("resume", "overwrite"):
        raise ConfigError(f"--mode {mode!r}: expected resume or overwrite")
    if executor is not None and executor not in ("ray", "local"):
        raise ConfigError(f"--executor {executor!r}: expected ray or local")
    # The flags first: a typo there is reported before the profile is loaded.
    wanted = parse_levels(level, levels)
    request = driver.RunRequest(input, output, wanted, mode, shards, limit)  # type: ignore[arg-type]
    cfg = load_config(profile, config, set_ or [])
    bars: dict[int, Any] = {}
    rows: dict[int, int] = {}
    started = time.monotonic()

    def on_event(event: dict[str, Any]) -> None:
        from tqdm import tqdm

        if event["type"] == "plan":
            for lvl, count in event["planned"].items():
                bars[lvl] = tqdm(total=count, desc=f"level {lvl}", unit="unit", file=sys.stderr)
        elif event["type"] == "units":  # a shard was indexed: its units join the totals
            for lvl, count in event["planned"].items():
                if lvl in bars:
                    bars[lvl].total += count
                    bars[lvl].refresh()
        elif event["type"] == "committed" and event["level"] in bars:
            lvl = event["level"]
            rows[lvl] = rows.get(lvl, 0) + int(event.get("rows") or 0)
            # Wall-clock images/s of this level since the run began: what the run really delivers.
            rate = rows[lvl] / max(time.monotonic() - started, 1e-9)
            bars[lvl].update(1)
            bars[lvl].set_postfix(ok=event["ok"], failed=event["failed"], img_s=f"{rate:.2f}")
        elif event["type"] == "unit_error":
            tqdm.write(f"level {event['level']} unit {event['unit']}: {event['error']}", file=sys.stderr)

    try:
        summary = driver.run(cfg, request, executor, on_event, log_level)
    except StartupFailed as exc:
        typer.echo(f"grand: error: a model failed its start-up check: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        for bar in bars.values():
            bar.close()
    if not any(summary.planned.values()):
        typer.echo(f"nothing to do: level(s) {wanted} already committed for every selected shard")
    for lvl, shard_ids in sorted(summary.blocked.items()):
        typer.echo(f"level {lvl}: {len(shard_ids)} unit(s) wait for level {lvl - 1} to be committed")
    _print_status(output)
    if summary.failed:
        for key, error in summary.failed.items():
            typer.echo(f"failed: {key}: {error}", err=True)
        typer.echo(f"{len(summary.failed)} unit(s) failed; rerun the same command to retry them", err=True)
        raise typer.Exit(1)


def _print_status(output: str) -> dict[str, Any]:
    from grand_pipeline.status import format_eta, level_extras, run_status
    from grand_pipeline.store import Store

    store = Store(output)
    status = run_status(store)
    # img/s: rows over summed unit seconds (per worker); wall img/s: over the run's elapsed time.
    typer.echo(f"{'level':<6}{'units':>12}{'shards':>10}{'images ok':>11}{'failed':>8}{'img/s':>9}{'wall img/s':>12}{'ETA':>10}")
    for entry in status["levels"]:
        units = f"{entry['units_committed']}/{entry['units_total']}"
        shards = f"{entry['shards_committed']}/{entry['shards_total']}"
        extra = level_extras(entry, store.committed(entry["level"]), time.time())
        wall = extra["wall_images_per_second"]
        typer.echo(
            f"{entry['level']:<6}{units:>12}{shards:>10}{entry['images_ok']:>11}{entry['images_failed']:>8}"
            f"{entry['images_per_second']:>9.2f}{'n/a' if wall is None else f'{wall:.2f}':>12}"
            f"{format_eta(extra['eta_seconds']):>10}"
        )
        for stage, count in sorted(entry.get("failures_by_stage", {}).items()):
            typer.echo(f"{'':6}failures in {stage}: {count}")
    return status


@app.command()
@friendly
def status(
    output: Annotated[str, typer.Option("--output", "-o")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Per level: units and shards committed/total, images ok/failed, throughput."""
    from grand_pipeline.locations import require_existing
    from grand_pipeline.status import run_status
    from grand_pipeline.store import Store

    require_existing(Store(output))  # a mistyped --output is an error, not an empty table
    if as_json:
        typer.echo(json.dumps(run_status(Store(output)), indent=2, sort_keys=True))
        return
    status = _print_status(output)
    matrix = status.get("matrix", {})
    if matrix:
        levels = sorted({lvl for row in matrix.values() for lvl in row}, key=int)
        shards = sorted(matrix)
        # On a 1,000-shard run only the unfinished shards are worth a line each.
        if len(shards) > _MATRIX_ROWS:
            shards = [s for s in shards if any(v != "committed" for v in matrix[s].values())]
        width = max([len("shard"), *map(len, shards)])
        typer.echo("\n" + "shard".ljust(width) + "".join(f"  L{lvl}" for lvl in levels))
        for shard in shards[:_MATRIX_ROWS]:
            marks = "".join(f"  {_MATRIX_MARK.get(matrix[shard].get(lvl, ''), '.'):<2}" for lvl in levels)
            typer.echo(f"{shard.ljust(width)}{marks}")
        hidden = len(matrix) - min(len(shards), _MATRIX_ROWS)
        if hidden:
            typer.echo(f"({hidden} more shard(s) not listed: {len(matrix) - len(shards)} fully committed)")


@app.command()
@friendly
def dashboard(
    output: Annotated[str, typer.Option("--output", "-o", help="Output folder or URI of a run.")],
    host: Annotated[str, typer.Option(help="Interface to bind; keep 127.0.0.1 unless you must share.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0 picks a free one).")] = 8765,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Serve a read-only web page of per-level progress, throughput and ETA (Ctrl-C stops it)."""
    from grand_pipeline.dashboard import make_server

    _setup_logging(verbose)
    server = make_server(output, host, port)
    typer.echo(f"grand dashboard for {output}: http://{host}:{server.server_port}/ (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@app.command("make-sample")
@friendly
def make_sample(
    output: Annotated[str, typer.Option("--output", "-o", help="Folder to write the tar into.")],
    images: Annotated[int, typer.Option(help="How many photographs (max 6).")] = 6,
    profile: Annotated[str, typer.Option(help="Profile whose segmenter makes the masks.")] = "lite",
    shard: Annotated[str, typer.Option(help="Shard id (tar stem).")] = "sa_000000",
    start: Annotated[int, typer.Option(help="First image number (ids sa_START ...).")] = 1,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Write an SA-1B-format tar from scikit-image photographs, masks from the lite segmenter."""
    from tqdm import tqdm

    from grand_pipeline.config import load_config
    from grand_pipeline.sample import make_sample as build

    _setup_logging(verbose)
    cfg = load_config(profile)
    with tqdm(total=images, desc="sample", unit="img", file=sys.stderr) as bar:
        path = build(output, cfg, images=images, shard_id=shard, progress=lambda: bar.update(1), start=start)
    typer.echo(f"wrote {path}")


@app.command()
@friendly
def show(
    output: Annotated[str, typer.Option("--output", "-o")],
    image: Annotated[str, typer.Option(help="Image id, e.g. sa_1.")],
    to: Annotated[str, typer.Option(help="PNG file to write, or .html (image + coloured caption).")],
    level: Annotated[int | None, typer.Option(help="Level to draw (default: highest committed).")] = None,
) -> None:
    """Render an image's masks, boxes and labels."""
    from grand_pipeline.show import render

    path = render(output, image, to, level)
    typer.echo(f"wrote {path}")


@app.command()
@friendly
def export(
    output: Annotated[str, typer.Option("--output", "-o", help="Output folder or URI of a run.")],
    to: Annotated[str, typer.Option("--to", help="Local folder to write the files into.")],
    format_: Annotated[
        str, typer.Option("--format", help="grand-json, grand-ref, or an add-on's: glamm, grandf-gcg, ...")
    ] = "grand-json",
    only_verified: Annotated[
        bool | None,
        typer.Option(
            "--only-verified/--all-captions",
            help="Keep only verified dense captions (default: the format's; training formats: verified).",
        ),
    ] = None,
    methods: Annotated[
        str | None, typer.Option(help="Grounding methods kept (training formats): exact,embedding[,noun].")
    ] = None,
    no_floating: Annotated[
        bool, typer.Option("--no-floating", help="Drop phrases on floating objects (training formats).")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Write the highest committed level in a published layout; the summary (counts by reason, error
    rows) goes to TO/_export/summary.json."""
    from grand_pipeline.export import ExportOptions, summary_path
    from grand_pipeline.export import export as run_export

    _setup_logging(verbose)
    options = ExportOptions(
        only_verified=only_verified,
        methods=None if methods is None else tuple(m.strip() for m in methods.split(",") if m.strip()),
        floating=False if no_floating else None,
    )
    summary = run_export(output, format_, to, options)
    typer.echo(f"exported {summary['exported']} {summary['unit']} to {to} (level {summary['level']})")
    for reason, count in summary["counts"].items():
        typer.echo(f"  {reason}: {count}")
    typer.echo(f"summary: {summary_path(to)}")


@app.command("retry-failed")
@friendly
def retry_failed(
    output: Annotated[str, typer.Option("--output", "-o", help="Output folder or URI of a run.")],
    level: Annotated[int, typer.Option(help="Level whose error rows are recomputed.")],
    input: Annotated[str | None, typer.Option("--input", "-i", help="Input (default: the run's).")] = None,
    profile: Annotated[str, typer.Option(help="The run's profile.")] = "lite",
    config: Annotated[str | None, typer.Option(help="The run's --config.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="The run's --set overrides.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Recompute only the failed images of a level (and their rows in the levels after it)."""
    from grand_pipeline.config import load_config
    from grand_pipeline.retry import retry_failed as run_retry

    _setup_logging(verbose)
    parse_levels(level, None)  # a level that does not exist is a typo, not "no failed images"
    cfg = load_config(profile, config, set_ or [])
    summary = run_retry(cfg, output, level, input)
    if not summary.recomputed:
        typer.echo(f"level {level}: no failed images in committed units")
        return
    for lvl, shards in sorted(summary.recomputed.items()):
        typer.echo(f"level {lvl}: {sum(map(len, shards.values()))} image(s) recomputed in {len(shards)} unit(s)")
    typer.echo(f"level {level}: {summary.fixed} fixed, {summary.still_failed} still failed "
               f"(attempt {summary.attempt})")


@app.command()
@friendly
def plan(
    output: Annotated[str, typer.Option("--output", "-o", help="Output folder or URI of a run.")],
    gpus: Annotated[float, typer.Option(help="GPU budget to split between the levels.")],
    profile: Annotated[str, typer.Option(help="Profile whose pools give GPUs per actor.")] = "lite",
    config: Annotated[str | None, typer.Option(help="YAML merged over the profile.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="dotted.key=value override.")] = None,
) -> None:
    """Actors and GPUs per level from measured throughput, and an ETA for the remaining units."""
    from grand_pipeline.config import load_config
    from grand_pipeline.plan import make_plan

    result = make_plan(load_config(profile, config, set_ or []), output, gpus)
    typer.echo(f"{'level':<6}{'s/img':>9}{'gpu/act':>8}{'actors':>7}{'gpus':>6}{'cpus':>6}"
               f"{'img/s':>9}{'left':>6}  bottleneck stage")
    for lv in result.levels:
        typer.echo(f"{lv.level:<6}{lv.seconds_per_image:>9.3f}{lv.gpus_per_actor:>8.2f}{lv.actors:>7}"
                   f"{lv.gpus:>6.1f}{lv.actors * lv.cpus_per_actor:>6.0f}{lv.images_per_s:>9.2f}"
                   f"{lv.units_remaining:>6}  {lv.bottleneck_stage or '-'}")
    for level in result.unmeasured:
        typer.echo(f"level {level}: no committed unit to measure; run a calibration shard first")
    eta = result.eta_s()
    typer.echo(f"pipeline: {result.images_per_s:.2f} img/s with {result.gpus_used:g}/{gpus:g} GPUs; "
               f"ETA {eta / 3600:.2f} h ({eta:.0f} s) for the remaining shards")


def _mount_plugins() -> None:
    """``grand <name>`` for every ``grand.commands`` entry point (the GLaMM companion: ``glamm``)."""
    from grand_pipeline.plugins import COMMANDS, load

    for name, sub_app in load(COMMANDS).items():
        app.add_typer(sub_app, name=name)


_mount_plugins()


def main() -> None:  # pragma: no cover - console entry for `python -m`
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
