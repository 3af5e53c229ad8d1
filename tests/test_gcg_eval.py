"""GCG evaluation (``grand glamm eval-gcg``) on fixed inputs: AP50 vs COCOeval, captions vs the
pycocoevalcap scorers, hand-made mIoU cases, the reference's recall loop (cases A-D) vs the
assignment definition, bad inputs, the CLI, and the real MiniLM embedder path."""

from __future__ import annotations

import json
import re
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from grand_pipeline.training.eval import gcg, metrics, recall
from grand_pipeline.training.eval.gcg import EvalOptions, evaluate_gcg, run_eval_gcg
from grand_pipeline.training.eval.gt import gt_from_samples, read_gt
from grand_pipeline.training.eval.io import EvalInputError, Prediction, read_predictions

H, W = 20, 30


def rect(y0: int, y1: int, x0: int, x1: int) -> dict:
    """A compressed RLE (str counts) of a filled rectangle in an H x W frame."""
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": [H, W], "counts": rle["counts"].decode("ascii")}


def bow_embed(texts: list[str]) -> np.ndarray:
    """Deterministic bag-of-words embedder (crc32 buckets, stop words dropped), unit rows."""
    out = np.zeros((len(texts), 64))
    for i, text in enumerate(texts):
        for word in re.findall(r"[a-z]+", text.lower()):
            if word not in {"a", "an", "the", "of"}:
                out[i, zlib.crc32(word.encode()) % 64] += 1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return np.divide(out, norms, out=np.zeros_like(out), where=norms > 0)


# Ground truth: three images, 2-3 grounded phrases each.
GT = {
    "img_a": ("A man rides a horse on the beach.", ["a man", "a horse", "the beach"],
              [rect(0, 10, 0, 10), rect(5, 15, 10, 20), rect(15, 20, 0, 30)]),
    "img_b": ("A red car parked near a tree.", ["a red car", "a tree"],
              [rect(10, 20, 0, 15), rect(0, 10, 20, 30)]),
    "img_c": ("Two dogs play in the grass.", ["two dogs", "the grass"],
              [rect(0, 8, 0, 12), rect(12, 20, 0, 30)]),
}


def write_gt_dir(folder: Path, gt: dict = GT, split: str = "val") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    images = [{"id": i, "file_name": f"{i}.jpg", "height": H, "width": W} for i in gt]
    anns, caps = [], []
    for image_id, (caption, phrases, masks) in gt.items():
        for m in masks:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "segmentation": m,
                         "area": float(mask_utils.area(m)), "bbox": mask_utils.toBbox(m).tolist(), "iscrowd": 0})
        caps.append({"id": len(caps) + 1, "image_id": image_id, "caption": caption, "labels": phrases})
    (folder / f"{split}_gcg_coco_mask_gt.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]}))
    (folder / f"{split}_gcg_coco_caption_gt.json").write_text(json.dumps({"images": images, "annotations": caps}))
    return folder


def write_preds(folder: Path, preds: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for image_id, doc in preds.items():
        (folder / f"{image_id}.json").write_text(json.dumps({"image_id": image_id, **doc}))
    return folder


def perfect_preds() -> dict:
    return {i: {"caption": c, "phrases": p, "pred_masks": m, "scores": [1.0] * len(m)} for i, (c, p, m) in GT.items()}


# Imperfect predictions: one shifted mask, one wrong extra mask, one renamed phrase, a caption each.
IMPERFECT = {
    "img_a": {"caption": "A man riding a horse at the beach.", "phrases": ["a man", "a horse", "a pony"],
              "pred_masks": [rect(0, 10, 0, 10), rect(5, 15, 12, 22), rect(0, 5, 20, 30)],
              "scores": [0.9, 0.7, 0.8]},
    "img_b": {"caption": "A car next to a tree.", "phrases": ["a car", "a tree"],
              "pred_masks": [rect(10, 20, 0, 12), rect(0, 10, 20, 30)], "scores": [0.6, 0.95]},
    "img_c": {"caption": "A dog on the grass.", "phrases": ["a dog"], "pred_masks": [rect(12, 20, 0, 30)],
              "scores": [0.5]},
}


@pytest.fixture(scope="module")
def imperfect(tmp_path_factory):
    root = tmp_path_factory.mktemp("gcg")
    gt_dir, pred_dir = write_gt_dir(root / "gt"), write_preds(root / "pred", IMPERFECT)
    report = run_eval_gcg(pred_dir, str(gt_dir), embed=bow_embed)
    return gt_dir, pred_dir, report


@pytest.fixture
def no_captions(monkeypatch):
    """Skip the Java caption scorers in tests about other metrics."""
    monkeypatch.setattr(metrics, "caption_scores", lambda refs, hyps: dict.fromkeys(metrics.CAPTION_METRICS, 0.0))


def direct_ap50(gt_dir: Path, dets: list[dict]) -> float:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco_gt = COCO(str(gt_dir / "val_gcg_coco_mask_gt.json"))
    evaluator = COCOeval(coco_gt, coco_gt.loadRes(dets), "segm")
    evaluator.params.catIds = [1]
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return float(evaluator.stats[1])


def test_ap50_equals_direct_cocoeval(imperfect):
    gt_dir, _, report = imperfect
    dets = [{"image_id": i, "category_id": 1, "segmentation": m, "score": s}
            for i, d in IMPERFECT.items() for m, s in zip(d["pred_masks"], d["scores"], strict=True)]
    assert report["AP50"] == pytest.approx(direct_ap50(gt_dir, dets), abs=1e-12)
    assert 0.0 < report["AP50"] < 1.0


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_constant_ap_is_order_dependent_like_the_reference(tmp_path, order, no_captions):
    good, bad = rect(0, 10, 0, 10), rect(10, 20, 20, 30)
    masks = [[good, bad][k] for k in order]
    gt = {"img_a": ("A man.", ["a man"], [good])}
    gt_dir = write_gt_dir(tmp_path / "gt", gt)
    pred_dir = write_preds(tmp_path / "pred", {"img_a": {"caption": "A man.", "phrases": ["a man", "x"],
                                                         "pred_masks": masks}})
    report = run_eval_gcg(pred_dir, str(gt_dir), embed=bow_embed, options=EvalOptions(ap_score="constant"))
    dets = [{"image_id": "img_a", "category_id": 1, "segmentation": m, "score": 1.0} for m in masks]
    assert report["AP50"] == pytest.approx(direct_ap50(gt_dir, dets))
    assert report["AP50"] == pytest.approx(1.0 if order == (0, 1) else 0.5, abs=0.02)
    assert "scores_missing_used_1.0" not in report["warnings"]  # constant mode never reads scores


def test_caption_metrics_equal_direct_scorer_calls(imperfect):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    _, _, report = imperfect
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c}] for i, (c, _, _) in GT.items()})
    res = tok.tokenize({i: [{"caption": d["caption"]}] for i, d in IMPERFECT.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    want = {f"BLEU-{k + 1}": bleu[k] for k in range(4)}
    want["METEOR"], _ = Meteor().compute_score(gts, res)
    want["ROUGE_L"], _ = Rouge().compute_score(gts, res)
    want["CIDEr"], _ = Cider().compute_score(gts, res)
    for key, value in want.items():
        assert report[key] == pytest.approx(value, abs=1e-12), key
    assert 0 < report["CIDEr"] and 0 < report["METEOR"] < 1


def test_report_keys_counts_and_warnings(imperfect):
    _, _, report = imperfect
    for key in ("AP50", "mIoU", "mIoU_penalised", "recall", "recall_legacy", "METEOR", "CIDEr", "images",
                "phrases", "BLEU-1", "BLEU-4", "ROUGE_L", "mismatches", "skips"):
        assert key in report
    assert report["images"] == 3 and report["phrases"] == 7
    # img_a: man (IoU 1, same words) TP; horse IoU 0.67 TP; beach vs the wrong pony mask IoU 0.
    # img_b: car IoU 0.8, "a car" vs "a red car" cos 0.71 TP; tree TP. img_c: grass mask, "a dog": FP.
    assert report["true_positives"] == {"assignment": 4, "legacy": 4}
    assert report["recall"] == pytest.approx(4 / 7)
    json.dumps(report, allow_nan=False)


def test_miou_hand_cases():
    a, b, c = rect(0, 10, 0, 10), rect(10, 20, 0, 10), rect(0, 10, 20, 30)
    half = rect(0, 10, 0, 5)  # half of a: IoU 0.5
    # One perfect prediction among two GT masks: the reference ignores the unmatched GT mask.
    one = metrics.image_miou(metrics.mask_iou([a, b], [a], (H, W)))
    assert (one.miou, one.miou_penalised, one.unmatched_gt, one.unmatched_pred) == (1.0, 0.5, 1, 0)
    # Half-overlap plus an unmatched extra prediction: paired 0.5; penalised 0.5 / (1 + 1).
    two = metrics.image_miou(metrics.mask_iou([a], [half, c], (H, W)))
    assert (two.miou, two.miou_penalised, two.unmatched_pred) == (0.5, 0.25, 1)
    # No overlap at all: 0 (never NaN); no predictions: 0.
    assert metrics.image_miou(metrics.mask_iou([a], [c], (H, W))).miou == 0.0
    assert metrics.image_miou(metrics.mask_iou([a, b], [], (H, W))).miou_penalised == 0.0
    # A predicted mask of another frame size scores 0 instead of failing.
    other = {"size": [H + 1, W], "counts": mask_utils.encode(np.zeros((H + 1, W), np.uint8, order="F"))["counts"]}
    assert metrics.mask_iou([a], [other, a], (H, W)).tolist() == [[0.0, 1.0]]


def test_greedy_pairs_is_the_reference_pairing():
    ious = np.array([[0.9, 0.8], [0.85, 0.0]])  # greedy takes 0.9, then nothing: (0,0) only
    assert metrics.greedy_pairs(ious) == [(0, 0)]
    assert metrics.image_miou(ious).miou == pytest.approx(0.9)
    assert recall.one_to_one(ious) == [(0, 1), (1, 0)]  # the assignment maximises the sum


def test_end_to_end_miou_with_unmatched_gt(tmp_path, no_captions):
    gt = {"img_a": ("A man and a dog.", ["a man", "a dog"], [rect(0, 10, 0, 10), rect(10, 20, 0, 10)])}
    pred = {"img_a": {"caption": "A man.", "phrases": ["a man"], "pred_masks": [rect(0, 10, 0, 10)], "scores": [1.0]}}
    report = run_eval_gcg(write_preds(tmp_path / "p", pred), str(write_gt_dir(tmp_path / "g", gt)), embed=bow_embed)
    assert (report["mIoU"], report["mIoU_penalised"]) == (1.0, 0.5)
    assert report["recall"] == report["recall_legacy"] == 0.5
    assert report["masks"]["unmatched_gt"] == 1


CASES = {  # (IoU GT x pred, similarity GT x pred, legacy TP, assignment TP)
    "A": (np.diag([0.9, 0.8]), np.diag([0.3, 0.95]), 0, 1),
    "B": (np.array([[0.8, 0.6]]), np.array([[0.2, 0.9]]), 0, 0),
    "C": (np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([[0.9, 0.0], [0.1, 0.7]]), 2, 2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_recall_cases_legacy_vs_assignment(case):
    ious, sims, legacy_tp, assignment_tp = CASES[case]
    assert len(recall.legacy_matches(ious, sims)) == legacy_tp
    assert len(recall.assignment_matches(ious, sims)) == assignment_tp
    if case == "A":
        assert recall.assignment_matches(ious, sims) == [(1, 1)]


def test_recall_case_d_count_mismatch_is_reported_not_mispaired():
    a, b, c = rect(0, 10, 0, 10), rect(10, 20, 0, 10), rect(0, 10, 20, 30)
    ious = metrics.mask_iou([a, b], [c, a, b], (H, W))  # 3 predicted masks, 2 phrases
    cache = recall.EmbeddingCache(bow_embed)
    # By position "a man" would pair with mask b and "a dog" with nothing: never scored that way.
    result = recall.image_recall("img_d", ["a man", "a dog"], ["a man", "a dog"], ious, cache)
    assert (result.gt_phrases, result.tp_assignment, result.tp_legacy) == (2, 0, 0)
    assert result.mismatches == [{"image_id": "img_d", "side": "pred", "phrases": 2, "masks": 3}]
    with pytest.raises(ValueError, match="differ"):
        recall.legacy_matches(ious, np.ones((2, 2)))


def test_mismatch_end_to_end_gt_and_pred_sides(tmp_path, no_captions):
    gt = dict(GT)
    gt["img_b"] = ("A red car parked near a tree.", ["a red car"], GT["img_b"][2])  # GT: 1 phrase, 2 masks
    preds = perfect_preds()
    preds["img_c"] = {**preds["img_c"], "phrases": ["two dogs"]}  # prediction: 1 phrase, 2 masks
    report = run_eval_gcg(write_preds(tmp_path / "p", preds), str(write_gt_dir(tmp_path / "g", gt)), embed=bow_embed)
    sides = {(m["image_id"], m["side"]) for m in report["mismatches"]}
    assert sides == {("img_b", "gt"), ("img_c", "pred")}
    assert report["phrases"] == 3 + 1 + 2  # mismatched images keep their GT phrases in the denominator
    assert report["true_positives"]["assignment"] == 3 and report["recall"] == pytest.approx(3 / 6)
    assert report["mIoU"] == 1.0  # masks are still scored


def test_perfect_predictions_score_one(tmp_path, no_captions):
    report = run_eval_gcg(write_preds(tmp_path / "p", perfect_preds()), str(write_gt_dir(tmp_path / "g")),
                          embed=bow_embed)
    for key in ("AP50", "mIoU", "mIoU_penalised", "recall", "recall_legacy"):
        assert report[key] == pytest.approx(1.0), key
    assert not report["mismatches"] and not report["skips"] and not report["warnings"]


def test_missing_and_unknown_predictions_and_scores_fallback(tmp_path, no_captions):
    preds = perfect_preds()
    del preds["img_c"]
    preds["img_x"] = dict(preds["img_a"])
    for doc in preds.values():
        doc.pop("scores")
    report = run_eval_gcg(write_preds(tmp_path / "p", preds), str(write_gt_dir(tmp_path / "g")), embed=bow_embed)
    assert (report["images"], report["missing_predictions"], report["unknown_predictions"]) == (3, 1, 1)
    assert report["recall"] == pytest.approx(5 / 7) and report["mIoU"] == pytest.approx(2 / 3)
    assert report["warnings"]["scores_missing_used_1.0"] == 2
    subset = run_eval_gcg(tmp_path / "p", str(tmp_path / "g"), embed=bow_embed,
                          options=EvalOptions(only_predicted=True))
    assert subset["images"] == 2 and subset["recall"] == 1.0


def test_bad_prediction_files_are_counted_skips(tmp_path, no_captions):
    pred_dir = write_preds(tmp_path / "p", perfect_preds())
    (pred_dir / "broken.json").write_text("{not json")
    (pred_dir / "nokeys.json").write_text(json.dumps({"image_id": "img_z", "caption": "x"}))
    (pred_dir / "badmask.json").write_text(json.dumps(
        {"image_id": "img_y", "caption": "x", "phrases": ["x"], "pred_masks": [{"size": [2, 2], "counts": [1]}]}))
    (pred_dir / "badscores.json").write_text(json.dumps({**perfect_preds()["img_a"], "image_id": "img_w",
                                                          "scores": [1.0]}))
    report = run_eval_gcg(pred_dir, str(write_gt_dir(tmp_path / "g")), embed=bow_embed)
    assert report["skips"] == {"bad_format": 2, "not_json": 1}
    assert {f["file"] for f in report["skipped_files"]} == {"broken.json", "nokeys.json", "badmask.json"}
    assert report["warnings"]["bad_scores"] == 1 and report["recall"] == 1.0


def test_unusable_prediction_dirs_raise(tmp_path):
    with pytest.raises(EvalInputError, match="not a folder"):
        read_predictions(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalInputError, match="no \\*.json"):
        read_predictions(tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.json").write_text("nope")
    with pytest.raises(EvalInputError, match="no readable prediction among 1 files \\(1 not_json\\)"):
        read_predictions(tmp_path / "junk")


def test_gt_dir_errors(tmp_path):
    write_gt_dir(tmp_path / "two", split="val")
    write_gt_dir(tmp_path / "two", split="test")
    with pytest.raises(EvalInputError, match="give --split"):
        read_gt(str(tmp_path / "two"))
    assert len(read_gt(str(tmp_path / "two"), split="test")[0]) == 3


def test_gt_from_samples_keeps_the_first_dense_sample():
    from grand_pipeline.training.data.samples import GCGSample, ImageRef, Phrase

    def sample(image_id: str, source: str) -> GCGSample:
        caption, phrases, masks = GT[image_id]
        ref = ImageRef(image_id, "000000", f"{image_id}.jpg", W, H)
        spans = tuple(Phrase(p, 0, len(p), (k,), m, "exact") for k, (p, m) in enumerate(zip(phrases, masks, strict=True)))
        return GCGSample(ref, caption if source == "dense" else "short", spans if source == "dense" else (), source)

    gt = gt_from_samples([sample("img_a", "short:0"), sample("img_a", "dense"), sample("img_b", "dense")])
    assert list(gt) == ["img_a", "img_b"] and gt["img_a"].phrases == ("a man", "a horse", "the beach")
    assert (gt["img_b"].height, gt["img_b"].width) == (H, W)


def test_committed_output_as_gt_oracle_scores_one(tmp_path, no_captions):
    """``--gt OUTPUT`` reads the converter's dense GCG samples; the gcg-oracle files score 1."""
    from grand_pipeline.store import Store
    from grand_pipeline.training.data.convert import ConvertOptions
    from grand_pipeline.training.data.rows import iter_gcg_ground_truth
    from grand_pipeline.training.exports import prediction
    from tests.test_export import commit, make_row

    out = tmp_path / "out"
    commit(out, 4, "a", [make_row("sa_1", "a"), make_row("sa_2", "a", error="LLM failed")])
    commit(out, 4, "b", [make_row("sa_3", "b")])
    samples = list(iter_gcg_ground_truth(Store(str(out)), ConvertOptions(), Counter()))
    assert [s.image.image_id for s in samples] == ["sa_1", "sa_3"] and samples[0].phrases
    pred_dir = write_preds(tmp_path / "p", {s.image.image_id: prediction(s) for s in samples})
    report = run_eval_gcg(pred_dir, str(out), embed=bow_embed)
    assert report["images"] == 2 and report["gt_counts"]["rows:error"] == 1
    for key in ("AP50", "mIoU", "mIoU_penalised", "recall", "recall_legacy"):
        assert report[key] == pytest.approx(1.0), key
    with pytest.raises(EvalInputError, match="no such folder"):
        read_gt(str(tmp_path / "nowhere"))


def test_embedding_cache_embeds_each_phrase_once():
    calls: list[list[str]] = []

    def embed(texts: list[str]) -> np.ndarray:
        calls.append(list(texts))
        return bow_embed(texts) * 3.0  # not normalised: the cache normalises

    cache = recall.EmbeddingCache(embed)
    cache.add(["a man", "a dog", "a man"])
    sims = cache.similarity(["a man"], ["a man", "a dog", "a cat"])
    assert calls == [["a dog", "a man"], ["a cat"]]
    assert sims[0, 0] == pytest.approx(1.0) and sims[0, 1] == pytest.approx(0.0)


def test_cli_json_and_report(tmp_path, monkeypatch, no_captions):
    from typer.testing import CliRunner

    from grand_pipeline.training.cli import app

    monkeypatch.setattr(gcg, "build_embedder", lambda name, profile: bow_embed)
    pred_dir, gt_dir = write_preds(tmp_path / "p", perfect_preds()), write_gt_dir(tmp_path / "g")
    (pred_dir / "broken.json").write_text("][")
    out_file = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["eval-gcg", "--pred", str(pred_dir), "--gt", str(gt_dir), "--json",
                                      "--report", str(out_file), "--ap-score", "constant"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["AP50"] == 1.0 and report["skips"] == {"not_json": 1}
    assert report["settings"]["ap_score"] == "constant"
    assert json.loads(out_file.read_text()) == report
    table = CliRunner().invoke(app, ["eval-gcg", "--pred", str(pred_dir), "--gt", str(gt_dir)])
    assert table.exit_code == 0 and "mIoU_penalised" in table.stdout and "not_json 1" in table.stdout


def test_cli_user_errors_exit_2(tmp_path):
    from typer.testing import CliRunner

    from grand_pipeline.training.cli import app

    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["eval-gcg", "--pred", str(tmp_path / "empty"), "--gt", str(tmp_path)])
    assert result.exit_code == 2 and "no *.json prediction files" in result.output
    bad = CliRunner().invoke(app, ["eval-gcg", "--pred", str(tmp_path), "--gt", str(tmp_path), "--ap-score", "x"])
    assert bad.exit_code == 2


def test_reference_bert_embedder_needs_local_weights(tmp_path):
    from grand_pipeline.models.backends.minilm import build_tiny
    from grand_pipeline.training.eval.embed import build_embedder

    with pytest.raises(EvalInputError, match="weights not found locally"):
        build_embedder("no-such-org/no-such-bert-model")
    build_tiny(tmp_path, seed=0)  # a tiny random BERT folder with a real tokenizer
    embed = build_embedder(str(tmp_path))
    vectors = embed(["a man", "a horse on the beach"])
    assert vectors.shape == (2, 32)
    assert np.linalg.norm(vectors, axis=1) == pytest.approx([1.0, 1.0], abs=1e-5)
    # The batched masked mean equals the reference's one-text-at-a-time mean.
    assert np.allclose(vectors[0], embed(["a man"])[0], atol=1e-5)


def test_real_minilm_embedder_path(tmp_path, no_captions):
    preds = perfect_preds()
    preds["img_b"] = {**preds["img_b"], "phrases": ["a red automobile", "a tree"]}
    report = run_eval_gcg(write_preds(tmp_path / "p", preds), str(write_gt_dir(tmp_path / "g")))
    assert report["settings"]["embedder"] == "minilm (profile lite)"
    assert report["recall"] == 1.0  # "a red automobile" ~ "a red car" under MiniLM
    wrong_words = Prediction("img_a", "x", ("a bowl of soup", "an airplane", "a violin"), tuple(GT["img_a"][2]), None)
    far = evaluate_gcg(read_gt(str(tmp_path / "g"))[0], {"img_a": wrong_words}, gcg.build_embedder("minilm"),
                       EvalOptions(only_predicted=True))
    assert far["recall"] == 0.0 and far["mIoU"] == 1.0
