"""The GLaMM model on CPU with tiny random weights: a real collate batch through forward/backward,
which parameters learn, determinism, overfitting, cached vs uncached generation, the state dicts,
the full model's key manifest (meta device) and the GCG inference round trip through the evaluator."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data as skdata

from grand_pipeline.config import ConfigError, build
from grand_pipeline.run_meta import RunMeta
from grand_pipeline.store import Store
from grand_pipeline.training.config import load_train_config
from grand_pipeline.training.data.collate import Collator
from grand_pipeline.training.data.dataset import GrandGlammDataset
from grand_pipeline.training.data.transforms import clip_image
from grand_pipeline.training.eval.gcg import run_eval_gcg
from grand_pipeline.training.infer import (
    caption_region,
    images_from_output,
    infer_command,
    run_infer,
    segment_expression,
)
from grand_pipeline.training.model.builder import build_model
from grand_pipeline.training.model.config import ModelConfig
from grand_pipeline.training.model.generation import greedy, parse_gcg, prompt_ids
from grand_pipeline.training.model.glamm import LOSS_KEYS
from tests.test_export import commit
from tests.test_gcg_eval import bow_embed
from tests.test_training_dataset import _row, _tar

MANIFEST = Path(__file__).parent / "data" / "glamm_full_manifest.json"
TASKS = ("gcg", "refseg", "region", "caption")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops are dominated by thread hand-offs; one thread is many times faster on 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return load_train_config("tiny").model


@pytest.fixture(scope="module")
def run_output(tmp_path_factory) -> Path:
    """A committed level 3 of two good rows whose pixels sit in one source tar."""
    root = tmp_path_factory.mktemp("glamm_model")
    coffee = skdata.coffee()
    _tar(root / "in" / "sa_000000.tar", [("sa_1", coffee), ("sa_3", coffee)])
    commit(root / "out", 3, "sa_000000", [_row("sa_1", "sa_000000"), _row("sa_3", "sa_000000")])
    RunMeta(Store(str(root / "out"))).write_run_meta(
        "profile: lite\n", {"input": str(root / "in"), "config_hash": "t"}
    )
    return root / "out"


def make(cfg: ModelConfig, seed: int = 0, **changes):
    torch.manual_seed(seed)
    return build_model(dataclasses.replace(cfg, **changes) if changes else cfg)


@pytest.fixture(scope="module")
def built(cfg):
    return make(cfg)


@pytest.fixture(scope="module")
def batch(cfg, built, run_output) -> dict:
    """One item per task (GCG, referring segmentation, region captioning, captioning), collated."""
    _, tok = built
    items = []
    for task in TASKS:
        data = cfg.data_config(max_length=512, task_weights={task: 1.0})
        items.append(next(iter(GrandGlammDataset(str(run_output), tok, data))))
    out = Collator.for_tokenizer(tok)(items)
    assert out["tasks"] == list(TASKS) and sum(len(m) for m in out["masks_list"]) >= 2
    assert out["bboxes"] is not None and out["bboxes"][2].shape[0] >= 1
    return out


def losses(model, batch, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)  # LoRA dropout
    return {k: float(v.detach()) for k, v in model(batch).items()}


def test_forward_backward_on_a_collate_batch(built, batch, cfg) -> None:
    model, _ = built
    model.zero_grad(set_to_none=True)
    out = model(batch)
    values = {k: v.detach() for k, v in out.items()}
    assert tuple(out) == LOSS_KEYS and all(v.ndim == 0 for v in out.values())
    assert int(values["n_masks"]) == sum(len(m) for m in batch["masks_list"])
    w = cfg.loss
    weighted = w.ce * values["ce"] + w.bce * values["bce"] + w.dice * values["dice"]
    assert math.isclose(float(values["loss"]), float(weighted), rel_tol=1e-5)
    assert all(math.isfinite(float(v)) for v in values.values())
    out["loss"].backward()
    assert model.model.region_encoder.roi_align.updims.weight.grad is not None


@pytest.mark.parametrize("vl, embeddings", [("trained", "new_rows"), ("frozen", "full")])
def test_exactly_the_intended_parameters_learn(cfg, batch, vl, embeddings) -> None:
    model, _ = make(cfg, vl_projection=vl, embeddings=embeddings)
    model(batch)["loss"].backward()
    learnt = (
        "model.region_encoder.",
        "model.text_hidden_fcs.",
        "model.grounding_encoder.mask_decoder.",
        "model.embed_tokens.",
        "lm_head.",
    ) + (("model.mm_projector.",) if vl == "trained" else ())
    for name, p in model.named_parameters():
        intended = name.startswith(learnt) or ".lora_" in name
        assert p.requires_grad == intended, name
        if not intended:
            assert p.grad is None, name
        elif "iou_prediction_head" not in name:  # SAM's IoU head is in no loss
            assert p.grad is not None, name
    for frozen in ("vision_tower", "grounding_encoder.image_encoder", "grounding_encoder.prompt_encoder"):
        assert not any(p.requires_grad for p in model.model.get_submodule(frozen).parameters())
    assert any(".lora_A." in n for n, _ in model.named_parameters())
    rows = torch.tensor(model.ids.new_rows)
    for weight in (model.model.embed_tokens.weight, model.lm_head.weight):
        old = torch.ones(weight.shape[0], dtype=torch.bool)
        old[rows] = False
        assert (weight.grad[old].abs().sum() == 0) == (embeddings == "new_rows")
        assert weight.grad[model.ids.seg].abs().sum() > 0


def test_same_seed_same_losses(cfg, batch) -> None:
    first, second = make(cfg)[0], make(cfg)[0]
    assert losses(first, batch) == losses(second, batch)
    assert losses(make(cfg, seed=1)[0], batch) != losses(first, batch)  # region encoder, L-P, LoRA init


def test_a_count_mismatch_names_the_image(built, batch) -> None:
    model, _ = built
    masks = list(batch["masks_list"])
    masks[0] = torch.cat([masks[0], masks[0][:1]])
    with pytest.raises(ValueError, match=batch["image_paths"][0]):
        model({**batch, "masks_list": masks})


def overfit_config(cfg: ModelConfig) -> ModelConfig:
    """The tiny config with a 128-wide LLM and whole embedding matrices: at lr 1e-3 the 64-wide
    one with new rows only needs more than 30 steps to halve its loss."""
    wide = dataclasses.replace(cfg.llm, hidden_size=128, intermediate_size=256)
    return dataclasses.replace(cfg, llm=wide, embeddings="full")


def assert_overfits(model, batch, cfg: ModelConfig, steps: int = 30) -> None:
    """``steps`` AdamW steps (lr 1e-3) on one batch halve the total loss and lower the mask loss."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.95))
    history = []
    for step in range(steps):
        torch.manual_seed(step)
        out = model(batch)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append({k: float(v.detach()) for k, v in out.items()})
    first, last = history[0], history[-1]
    assert last["loss"] <= 0.5 * first["loss"], (first, last)
    mask = lambda h: cfg.loss.bce * h["bce"] + cfg.loss.dice * h["dice"]  # noqa: E731
    assert mask(last) < mask(first), (first, last)


def test_overfitting_one_batch_halves_the_loss(cfg, batch) -> None:
    model, _ = make(overfit_config(cfg))
    assert_overfits(model, batch, cfg)


@pytest.fixture(scope="module")
def seg_prone(cfg):
    """A fresh tiny model whose [SEG] head row copies (x1.05) the first greedy token's, so [SEG] wins
    where that token would: generation emits [SEG] states and masks without any training."""
    model, tok = make(cfg)
    model.eval()
    pixels, _ = clip_image(skdata.coffee(), cfg.clip.image_size, cfg.clip_preprocess)
    ids = prompt_ids(tok, "Describe the image.", cfg.num_image_tokens)
    first = greedy(model, ids, pixels, None, 1, use_cache=True).token_ids[0]
    with torch.no_grad():
        model.lm_head.weight[model.ids.seg] = 1.05 * model.lm_head.weight[first]
    return model, tok, ids, pixels


def test_cached_generation_equals_full_recomputation(cfg, seg_prone) -> None:
    model, _, ids, pixels = seg_prone
    cached = greedy(model, ids, pixels, None, 12, use_cache=True)
    full = greedy(model, ids, pixels, None, 12, use_cache=False)
    assert cached.token_ids == full.token_ids and cached.token_ids[0] == model.ids.seg
    assert cached.seg_hidden.shape == (cached.token_ids.count(model.ids.seg), cfg.llm.hidden_size)
    torch.testing.assert_close(cached.seg_hidden, full.seg_hidden, atol=1e-5, rtol=1e-4)
    image = skdata.coffee()
    out = model.generate_gcg(image, max_new_tokens=12)
    k = out["token_ids"].count(model.ids.seg)
    assert k >= 1 and out["masks"].shape == (k, *image.shape[:2]) and out["masks"].dtype == bool
    assert out["seg_embeddings"].shape == (k, cfg.lp_dim) and len(out["scores"]) == len(out["iou_pred"]) == k
    assert all(0.0 <= s <= 1.0 for s in out["scores"])


def test_parse_gcg() -> None:
    text = "<p> A man </p> [SEG] rides <p> a horse </p> [SEG] ."
    assert parse_gcg(text) == ("A man rides a horse .", ["A man", "a horse"])


def test_state_dicts_round_trip_and_merge(cfg, batch) -> None:
    model, _ = make(cfg)
    # weight decay 0: with ``new_rows`` decay would still move the old rows, which are not saved
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model(batch)["loss"].backward()
    opt.step()  # LoRA's B leaves zero, so merging matters
    model.eval()
    trainable = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    assert "model.embed_tokens.weight.new_rows" in trainable and "model.embed_tokens.weight" not in trainable
    assert all(not k.startswith("model.vision_tower.") for k in trainable)
    fresh, _ = make(cfg)
    fresh.eval()
    fresh.load_trainable_state_dict(trainable)
    assert losses(fresh, batch) == losses(model, batch)
    with pytest.raises(KeyError, match="missing"):
        fresh.load_trainable_state_dict({k: v for k, v in trainable.items() if "lora" not in k})
    merged = model.merged_state_dict()
    assert not any(".lora_" in k or "base_layer" in k or "vision_tower" in k for k in merged)
    other, _ = make(cfg, seed=3)
    other.eval()
    other.load_merged_state_dict(merged)
    got, want = losses(other, batch), losses(model, batch)
    assert all(math.isclose(got[k], want[k], rel_tol=1e-4, abs_tol=1e-6) for k in want)


def test_full_model_matches_the_release_manifest() -> None:
    full = build(ModelConfig, {}, prefix="model")
    model, tokenizer = build_model(full, meta=True)
    assert tokenizer is None and model.device.type == "meta"
    merged = {k: list(v.shape) for k, v in model.merged_state_dict().items()}
    manifest = json.loads(MANIFEST.read_text())["keys"]
    assert sorted(set(merged) ^ set(manifest)) == []
    assert {k: v for k, v in merged.items() if manifest[k] != v} == {}

    def total(prefix: str) -> int:
        return sum(math.prod(s) for k, s in manifest.items() if k.startswith(prefix))

    assert total("model.mm_projector.") == 20_979_712  # 20.98 M
    assert total("model.region_encoder.") == 299_142_912  # 299.1 M
    assert total("model.region_encoder.roi_align.flatten_linear.") == 205_521_920
    assert total("model.text_hidden_fcs.") == 17_830_144  # 17.83 M
    assert manifest["model.embed_tokens.weight"] == manifest["lm_head.weight"] == [32_007, 4096]
    assert total("model.grounding_encoder.image_encoder.") == 637_026_048  # SAM ViT-H
    assert total("model.layers.") == 32 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096)  # Llama-7B blocks
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert lora == 4_194_304  # r=8 on 32 x (q_proj, v_proj)


def test_model_config_validation_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^model\.lp_dim:"):
        build(ModelConfig, {"lp_dim": 128}, prefix="model")
    with pytest.raises(ConfigError, match=r"model\.vl_projection"):
        build(ModelConfig, {"vl_projection": "sometimes"}, prefix="model")
    with pytest.raises(ConfigError, match=r"^model\.clip\.layers:"):
        build(ModelConfig, {"clip": {"layers": 8}}, prefix="model")  # 4 levels at stride 3 need 10
    with pytest.raises(ConfigError, match=r"^model\.region\.gn_groups:"):
        build(ModelConfig, {"region": {"gn_groups": 48}}, prefix="model")
    data = build(ModelConfig, {}, prefix="model").data_config(max_length=1536)
    assert (data.clip_size, data.sam_size, data.num_image_tokens, data.preprocess) == (336, 1024, 576, "pad")


def test_infer_round_trip_through_the_evaluator(seg_prone, cfg, run_output, tmp_path) -> None:
    model, tok, _, _ = seg_prone
    images = list(images_from_output(str(run_output)))
    assert [i for i, _ in images] == ["sa_1", "sa_3"]
    assert run_infer(model, tok, cfg, images, tmp_path / "pred", max_new_tokens=6) == 2
    doc = json.loads((tmp_path / "pred" / "sa_1.json").read_text())
    assert set(doc) == {"image_id", "caption", "phrases", "pred_masks", "scores"}
    assert len(doc["scores"]) == len(doc["pred_masks"]) >= 1
    assert doc["pred_masks"][0]["size"] == list(images[0][1].shape[:2])
    report = run_eval_gcg(tmp_path / "pred", str(run_output), embed=bow_embed)
    assert report["images"] == 2 and report["predicted_images"] == 2 and report["masks"]["pred"] >= 2
    assert np.isfinite(report["mIoU"]) and np.isfinite(report["AP50"])


def test_a_batch_without_masks_keeps_the_mask_head_in_the_graph(cfg, batch) -> None:
    """Region + caption items only: L-P and the mask decoder get (zero) gradients, as DDP needs."""
    model, tok = make(cfg)
    items = {k: (v[2:] if isinstance(v, list) else v) for k, v in batch.items()}
    items.update(
        {
            k: batch[k][2:]
            for k in ("global_enc_images", "input_ids", "labels", "attention_masks", "has_grounding")
        }
    )
    items["grounding_enc_images"] = None
    out = model(items)
    assert int(out["n_masks"]) == 0 and float(out["bce"]) == 0.0
    out["loss"].backward()
    lp = model.model.text_hidden_fcs[0][0].weight.grad
    assert lp is not None and float(lp.abs().sum()) == 0.0


def test_region_caption_and_referring_segmentation_prompts(seg_prone) -> None:
    model, _, _, _ = seg_prone
    image = skdata.coffee()
    captions = caption_region(
        model, image, np.array([[10, 20, 200, 150], [300, 100, 590, 390]]), max_new_tokens=4
    )
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    seg = segment_expression(model, image, "the white cup", max_new_tokens=4)
    assert seg["masks"].shape[1:] == image.shape[:2] and len(seg["scores"]) == seg["masks"].shape[0]


def test_infer_command_from_a_checkpoint_and_from_its_export(run_output, tmp_path) -> None:
    """``infer_command`` on the newest training checkpoint of an output, then on its merged export:
    the same predictions (LoRA merged into the base weights changes nothing)."""
    from grand_pipeline.training.train import checkpoint as ckpt_io
    from grand_pipeline.training.train.export import export_weights
    from grand_pipeline.training.train.loop import seed_everything

    train_cfg = load_train_config("tiny")
    seed_everything(train_cfg.seed)
    model, _ = build_model(train_cfg.model)
    with torch.no_grad():  # a trained adapter: merging must fold it in
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.5)
    out = str(tmp_path / "out")
    shutil.copytree(run_output, out)  # the checkpoint goes under this copy of the output
    ckpt_io.save(
        out,
        1,
        config_yaml=train_cfg.to_yaml(),
        config_hash=train_cfg.content_hash(),
        trainable=model.trainable_state_dict(),
        optimizer={},
        scheduler={},
        rng=[ckpt_io.rng_state()],
        cursors=[ckpt_io.Cursor()],
    )
    assert infer_command(None, out, None, ["sa_1"], str(tmp_path / "a"), 6) == 1
    export_weights(out, str(tmp_path / "export"))
    assert infer_command(str(tmp_path / "export"), out, None, ["sa_1"], str(tmp_path / "b"), 6) == 1
    a, b = (json.loads((tmp_path / d / "sa_1.json").read_text()) for d in ("a", "b"))
    assert (a["caption"], a["phrases"], len(a["pred_masks"])) == (
        b["caption"],
        b["phrases"],
        len(b["pred_masks"]),
    )
