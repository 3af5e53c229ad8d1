"""``grand export --format glamm | grandf-gcg | gcg-oracle`` on hand-built committed rows and a
real SA-1B-format tar (for pixels), whose path is the run's ``input`` in ``_run/run.json``.

The GranD-f checks follow the glamm reference §3.2: a schema written from it (keys, the
``token_positives`` spelling, RLEs decodable to the image's size, ``caption[s:e] == phrase``) and
a small re-typed reader following the authors' loader rules (``strip('"')`` the caption, decode
each phrase's ``rle_masks`` and ADD them as uint8), which must read back our phrases, offsets and
masks.
"""

from __future__ import annotations

import io
import json
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from skimage import data as skdata
from typer.testing import CliRunner

from grand_pipeline.cli import app
from grand_pipeline.export import SUMMARY_PATH, ExportOptions, export
from grand_pipeline.geometry import rle
from grand_pipeline.run_meta import RunMeta
from grand_pipeline.sources import write_sa1b_tar
from grand_pipeline.store import Store
from grand_pipeline.training.data import images as images_module
from grand_pipeline.training.data.convert import ConvertOptions, convert_row
from grand_pipeline.training.data.rows import NotReadyError, iter_committed_rows, iter_gcg_ground_truth
from grand_pipeline.training.data.samples import TASKS, GCGSample, to_json
from tests.test_export import CAPTION, H, W, commit, make_row, span

QUOTED = '"Cup one" sits by a cup and a cup.'  # a leading quote, and "a cup" twice


def jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def sa1b_item(stem: str, pixels: np.ndarray) -> tuple[str, bytes, dict[str, Any]]:
    height, width = pixels.shape[:2]
    meta = {
        "image": {"image_id": 1, "file_name": f"{stem}.jpg", "width": width, "height": height},
        "annotations": [],
    }
    return stem, jpeg(pixels), meta


def rows_of_shard_a() -> list[dict[str, Any]]:
    unverified = make_row("sa_4", "a")
    unverified["dense_caption"]["verified"] = False
    quoted = make_row("sa_5", "a", caption=QUOTED)
    second = QUOTED.index("a cup", QUOTED.index("a cup") + 1)
    quoted["dense_caption"]["details"] = [
        span(QUOTED, "Cup one", [1]),
        span(QUOTED, "a cup", [3], "embedding"),
        {"phrase": "a cup", "tokens_positive": [second, second + 5], "ids": [2], "method": "exact"},
    ]
    return [make_row("sa_1", "a"), make_row("sa_2", "a", error="LLM failed 3 times"), unverified, quoted]


def rows_of_shard_b() -> list[dict[str, Any]]:
    overlapping = make_row("sa_3", "b")
    overlapping["dense_caption"]["details"][0]["ids"] = [1, 3]  # cup and saucer overlap
    return [overlapping, make_row("sa_6", "b"), make_row("sa_7", "b")]


@pytest.fixture()
def run_output(tmp_path: Path) -> Path:
    """Shards a and b: tars with the coffee photo (sa_6 at another size, sa_7 absent), and level 4."""
    coffee = skdata.coffee()
    assert coffee.shape[:2] == (H, W)
    source = tmp_path / "input"
    write_sa1b_tar(str(source / "a.tar"), [sa1b_item(s, coffee) for s in ("sa_1", "sa_2", "sa_4", "sa_5")])
    write_sa1b_tar(str(source / "b.tar"), [sa1b_item("sa_3", coffee), sa1b_item("sa_6", skdata.chelsea())])
    out = tmp_path / "out"
    commit(out, 4, "a", rows_of_shard_a())
    commit(out, 4, "b", rows_of_shard_b())
    RunMeta(Store(str(out))).write_run_meta("profile: lite\n", {"input": str(source), "config_hash": "abc"})
    return out


def our_gcg(out: Path, opts: ConvertOptions) -> list[GCGSample]:
    return [s for row in iter_committed_rows(Store(str(out))) for s in convert_row(row, opts, Counter()).gcg]


def summary_of(to: Path) -> dict[str, Any]:
    return json.loads((to / SUMMARY_PATH).read_text())


# ----------------------------------------------------------------------------- glamm


def test_glamm_writes_one_jsonl_per_task_with_every_sample(run_output: Path, tmp_path: Path) -> None:
    to = tmp_path / "glamm"
    summary = export(str(run_output), "glamm", str(to))
    assert sorted(p.name for p in to.iterdir()) == sorted(["_export"] + [f"{t}.jsonl" for t in TASKS])
    expected: dict[str, list] = {task: [] for task in TASKS}
    for row in iter_committed_rows(Store(str(run_output))):
        samples = convert_row(row, ConvertOptions(), Counter())
        for task in TASKS:
            expected[task] += [json.loads(json.dumps(to_json(s))) for s in samples.by_task(task)]
    for task in TASKS:
        lines = [json.loads(line) for line in (to / f"{task}.jsonl").read_text().splitlines()]
        assert lines == expected[task] and lines, task
        assert all({"shard_id", "file_name"} <= line["image"].keys() for line in lines)
    dense = [s for s in expected["gcg"] if s["image"]["image_id"] == "sa_5" and s["source"] == "dense"]
    assert [p["text"] for p in dense[0]["phrases"]] == ["Cup one", "a cup", "a cup"]  # duplicates kept
    assert summary["samples"] == {task: len(expected[task]) for task in TASKS}
    assert summary["exported"] == sum(summary["samples"].values())
    counts = summary["counts"]
    assert (counts["rows:error"], counts["rows:ok"], counts["gcg:unverified"]) == (1, 6, 1)
    assert counts["phrase:method_noun"] >= 1  # "saucer" is a noun-fallback grounding
    assert summary["skipped_images"][0]["image_id"] == "sa_2"
    assert summary["images"]["input"].endswith("input")


def test_filters_are_export_options(run_output: Path, tmp_path: Path) -> None:
    default = export(str(run_output), "glamm", str(tmp_path / "d"))["counts"]
    loose = export(
        str(run_output), "glamm", str(tmp_path / "l"), ExportOptions(False, ("exact", "embedding", "noun"))
    )["counts"]
    assert "gcg:unverified" not in loose and "phrase:method_noun" not in loose
    assert loose["gcg:ok"] > default["gcg:ok"]
    strict = export(str(run_output), "glamm", str(tmp_path / "s"), ExportOptions(floating=False))["counts"]
    assert strict["phrase:floating"] >= 1
    lines = [json.loads(x) for x in (tmp_path / "s" / "gcg.jsonl").read_text().splitlines()]
    assert all(3 not in p["ids"] for line in lines for p in line["phrases"])  # 3 is the floating saucer


def test_below_level_3_and_bad_options_are_one_clear_line(run_output: Path, tmp_path: Path) -> None:
    early = tmp_path / "early"
    commit(early, 2, "a", [make_row("sa_1", "a", level=2)])
    with pytest.raises(NotReadyError, match="no level 3 or higher"):
        export(str(early), "glamm", str(tmp_path / "x"))
    runner = CliRunner()
    result = runner.invoke(
        app, ["export", "-o", str(early), "--format", "grandf-gcg", "--to", str(tmp_path / "x")]
    )
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"grand: error: no level 3 or higher is committed in {early}: run `grand run --levels 1-3` (or 1-4) first"
    ]
    bad = runner.invoke(
        app,
        [
            "export",
            "-o",
            str(run_output),
            "--format",
            "glamm",
            "--methods",
            "exact,guess",
            "--to",
            str(tmp_path / "y"),
        ],
    )
    assert bad.exit_code == 2 and bad.output.startswith("grand: error: --methods: ['guess']")


# ----------------------------------------------------------------------------- grandf-gcg


def check_grandf_schema(entries: Any, images: Path) -> None:
    """GranD-f GCG (glamm reference §3.2): a list of {file_name, caption, groundings: {phrase:
    {token_positives: [s, e], rle_masks: [RLE, ...]}}}; RLEs decode to the image's size."""
    assert isinstance(entries, list) and entries
    for entry in entries:
        assert entry.keys() == {"file_name", "caption", "groundings"}
        with Image.open(images / entry["file_name"]) as image:
            width, height = image.size
        assert isinstance(entry["groundings"], dict) and entry["groundings"]
        for phrase, grounding in entry["groundings"].items():
            assert grounding.keys() == {"token_positives", "rle_masks"}  # not "tokens_positive"
            start, end = grounding["token_positives"]
            assert isinstance(start, int) and isinstance(end, int)
            assert entry["caption"][start:end] == phrase
            assert grounding["rle_masks"]
            for rle_obj in grounding["rle_masks"]:
                assert rle_obj.keys() == {"size", "counts"}
                assert mask_utils.decode(rle_obj).shape == (height, width)


def read_grandf_like_the_authors(path: Path, images: Path) -> list[tuple[str, str, list]]:
    """Re-typed rules of their ``GCGBaseDataset``: strip('"') the caption; per phrase, decode the
    ``rle_masks`` and ADD them into a uint8 array; phrases sorted by start offset."""
    out = []
    for ann in json.loads(path.read_text()):
        caption = ann["caption"].strip('"')
        with Image.open(images / ann["file_name"]) as image:
            width, height = image.size
        phrases = []
        for phrase, grounding in ann["groundings"].items():
            binary_mask = np.zeros((height, width), dtype=np.uint8)
            for rle_obj in grounding["rle_masks"]:
                binary_mask += mask_utils.decode(rle_obj).astype(np.uint8).squeeze()
            phrases.append((grounding["token_positives"], phrase, binary_mask))
        phrases.sort(key=lambda p: p[0][0])
        out.append((ann["file_name"], caption, phrases))
    return out


def test_grandf_gcg_round_trips_through_the_authors_reading_rules(
    run_output: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    passes: list[str] = []
    real_iter_shard = images_module.iter_shard

    def counting_iter_shard(ref, only=None, start=0):
        passes.append(ref.shard_id)
        return real_iter_shard(ref, only, start)

    monkeypatch.setattr(images_module, "iter_shard", counting_iter_shard)
    to = tmp_path / "grandf"
    summary = export(str(run_output), "grandf-gcg", str(to))
    assert sorted(passes) == ["a", "b"]  # one streaming pass per shard
    assert sorted(p.name for p in to.iterdir()) == ["_export", "grandf_gcg.json", "images"]
    images = to / "images"
    entries = json.loads((to / "grandf_gcg.json").read_text())
    check_grandf_schema(entries, images)

    # Pixels: the source JPEG bytes, only for images whose size matches their row.
    assert sorted(p.name for p in images.iterdir()) == ["sa_1.jpg", "sa_3.jpg", "sa_4.jpg", "sa_5.jpg"]
    assert (images / "sa_1.jpg").read_bytes() == jpeg(skdata.coffee())
    counts = summary["counts"]
    assert (counts["images:size_mismatch"], counts["images:missing"], counts["images:ok"]) == (1, 1, 4)
    assert counts["grandf:no_image"] == 4  # sa_6 and sa_7: a dense and a short-caption sample each

    expected = [s for s in our_gcg(run_output, ConvertOptions()) if s.image.image_id not in ("sa_6", "sa_7")]
    read = read_grandf_like_the_authors(to / "grandf_gcg.json", images)
    assert summary["exported"] == len(read) == len(expected)
    for sample, (file_name, caption, phrases) in zip(expected, read, strict=True):
        shift = 1 if sample.caption.startswith('"') else 0
        assert file_name == f"{sample.image.image_id}.jpg"
        assert caption == sample.caption[shift:]
        firsts = {p.text: p for p in reversed(sample.phrases)}  # the first of each text wins
        kept = sorted(firsts.values(), key=lambda p: p.start)
        assert [(p[1], p[0]) for p in phrases] == [(p.text, [p.start - shift, p.end - shift]) for p in kept]
        for (_, text, summed), ours in zip(phrases, kept, strict=True):
            assert caption[ours.start - shift : ours.end - shift] == text
            assert summed.max() <= 1  # one OR'ed mask: their sum stays binary
            assert np.array_equal(summed, rle.decode_one(ours.mask).astype(np.uint8))

    # sa_3's "white cup" names the cup and the saucer it overlaps: one binary union.
    row = rows_of_shard_b()[0]
    cup, saucer = row["objects"][0]["segmentation"], row["floating_objects"][0]["segmentation"]
    assert rle.area([cup, saucer]).sum() > rle.area([rle.union([cup, saucer])])[0]  # they overlap
    [(_, _, phrases)] = [r for r in read if r[0] == "sa_3.jpg" and r[1] == CAPTION]
    assert (phrases[0][1], phrases[0][2].max()) == ("white cup", 1)
    assert np.array_equal(phrases[0][2], rle.decode_one(rle.union([cup, saucer])).astype(np.uint8))

    # "a cup" twice in sa_5: the first is kept, the second reported.
    assert summary["collisions"] == counts["grandf:phrase_collision"] == 1
    [collision] = summary["collided_phrases"]
    assert (collision["image_id"], collision["phrase"], collision["kept"]) == (
        "sa_5",
        "a cup",
        [QUOTED.index("a cup") - 1, QUOTED.index("a cup") + 4],
    )


# ----------------------------------------------------------------------------- gcg-oracle


def test_gcg_oracle_writes_the_ground_truth_as_prediction_files(run_output: Path, tmp_path: Path) -> None:
    to = tmp_path / "oracle"
    result = CliRunner().invoke(
        app, ["export", "-o", str(run_output), "--format", "gcg-oracle", "--to", str(to)]
    )
    assert result.exit_code == 0, result.output
    assert f"summary: {to / SUMMARY_PATH}" in result.output and "rows:error: 1" in result.output
    truth = list(iter_gcg_ground_truth(Store(str(run_output)), ConvertOptions(), Counter()))
    assert sorted(p.name for p in (to / "predictions").iterdir()) == sorted(
        f"{s.image.image_id}.json" for s in truth
    )
    for sample in truth:
        pred = json.loads((to / "predictions" / f"{sample.image.image_id}.json").read_text())
        assert pred.keys() == {"image_id", "caption", "phrases", "pred_masks", "scores"}
        assert (pred["image_id"], pred["caption"]) == (sample.image.image_id, sample.caption)
        assert pred["phrases"] == [p.text for p in sample.phrases]
        assert pred["scores"] == [1.0] * len(sample.phrases)
        for got, phrase in zip(pred["pred_masks"], sample.phrases, strict=True):
            assert mask_utils.decode(got).shape == (H, W)
            assert np.array_equal(mask_utils.decode(got), rle.decode_one(phrase.mask).astype(np.uint8))
    assert summary_of(to)["exported"] == len(truth)


def test_the_evaluator_scores_the_oracle_1(
    run_output: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gcg = pytest.importorskip("grand_pipeline.training.eval.gcg")
    from grand_pipeline.training.eval import metrics

    # Caption metrics run Java scorers; they are the evaluator's own tests' business.
    monkeypatch.setattr(
        metrics, "caption_scores", lambda refs, hyps: dict.fromkeys(metrics.CAPTION_METRICS, 0.0)
    )

    def same_text_same_vector(texts: list[str]) -> np.ndarray:
        vectors = np.zeros((len(texts), 4096))
        vectors[np.arange(len(texts)), [zlib.crc32(t.encode()) % 4096 for t in texts]] = 1.0
        return vectors

    export(str(run_output), "gcg-oracle", str(tmp_path / "oracle"))
    report = gcg.run_eval_gcg(
        tmp_path / "oracle" / "predictions", str(run_output), embed=same_text_same_vector
    )
    for key in ("AP50", "mIoU", "mIoU_penalised", "recall", "recall_legacy"):
        assert report[key] == pytest.approx(1.0), key
    assert report["missing_predictions"] == report["unknown_predictions"] == 0
