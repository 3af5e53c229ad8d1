"""The GLaMM Dataset and collate on committed outputs: pixels from the source tars, the batch
contract, masks, boxes in the CLIP frame, and every drop counted."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from skimage import data as skdata
from torch.utils.data import DataLoader

from grand_pipeline.models.hf_common import tiny_tokenizer
from grand_pipeline.run_meta import RunMeta
from grand_pipeline.sources import write_sa1b_tar
from grand_pipeline.store import Store, StoreError
from grand_pipeline.training.data.collate import IGNORE_LABEL, Collator
from grand_pipeline.training.data.convert import ConvertOptions
from grand_pipeline.training.data.dataset import DataConfig, DataConfigError, GrandGlammDataset
from grand_pipeline.training.data.tokens import IGNORE_INDEX, IMAGE_TOKEN_INDEX, SPECIAL_TOKENS, SpecialIds
from grand_pipeline.training.data.transforms import (
    clip_frame,
    clip_image,
    normalise_clip,
    normalise_sam,
    sam_image,
)
from grand_pipeline.units import unit_id
from tests.test_export import H, W, commit, make_row

CLIP, SAM, N_IMG = 32, 64, 4
BATCH_KEYS = {
    "image_paths",
    "global_enc_images",
    "grounding_enc_images",
    "bboxes",
    "input_ids",
    "labels",
    "attention_masks",
    "masks_list",
    "label_list",
    "resize_list",
    "offset",
    "questions_list",
    "sampled_classes_list",
    "inference",
    "conversation_list",
    "seg_positions",
    "has_grounding",
    "tasks",
}


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _tar(path: Path, items: list[tuple[str, np.ndarray]]) -> None:
    write_sa1b_tar(
        str(path),
        [
            (
                stem,
                _jpeg(img),
                {
                    "image": {
                        "image_id": i,
                        "width": img.shape[1],
                        "height": img.shape[0],
                        "file_name": f"{stem}.jpg",
                    },
                    "annotations": [],
                },
            )
            for i, (stem, img) in enumerate(items, start=1)
        ],
    )


def _row(image_id: str, shard: str, **kwargs) -> dict:
    row = make_row(image_id, shard, level=3, **kwargs)
    if row["dense_caption"]:  # "white cup" names the cup and the saucer: its mask is their OR
        row["dense_caption"]["details"][0]["ids"] = [1, 3]
    return row


@pytest.fixture(scope="module")
def run_output(tmp_path_factory) -> tuple[Path, Path]:
    """Two source tars and a committed level 3: sa_1 and sa_3 are good, sa_2 an error row, sa_4's
    pixels have another size than its row, sa_5 is not in its tar."""
    root = tmp_path_factory.mktemp("glamm")
    coffee = skdata.coffee()
    assert coffee.shape[:2] == (H, W)
    _tar(root / "in" / "sa_000000.tar", [("sa_1", coffee), ("sa_2", coffee), ("sa_4", skdata.chelsea())])
    _tar(root / "in" / "sa_000001.tar", [("sa_3", coffee)])
    out = root / "out"
    commit(
        out,
        3,
        "sa_000000",
        [
            _row("sa_1", "sa_000000"),
            _row("sa_2", "sa_000000", error="LLM failed"),
            _row("sa_4", "sa_000000"),
            _row("sa_5", "sa_000000"),
        ],
    )
    commit(out, 3, "sa_000001", [_row("sa_3", "sa_000001")])
    RunMeta(Store(str(out))).write_run_meta("profile: lite\n", {"input": str(root / "in"), "config_hash": "abc"})
    return out, root / "in"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(extra_special=SPECIAL_TOKENS)


def config(task: str | None = None, **kw) -> DataConfig:
    weights = {task: 1.0} if task else {"gcg": 1.0, "refseg": 1.0, "region": 1.0, "caption": 1.0}
    kw = {"clip_size": CLIP, "sam_size": SAM, "num_image_tokens": N_IMG, "max_length": 512, **kw}
    return DataConfig(task_weights=weights, **kw)


def dataset(run_output, tok, task: str | None = None, **kw) -> GrandGlammDataset:
    return GrandGlammDataset(str(run_output[0]), tok, config(task, **kw))


def rle_of(row: dict, oid: int) -> np.ndarray:
    obj = next(o for o in row["objects"] + row["floating_objects"] if o["id"] == oid)
    seg = dict(obj["segmentation"], counts=obj["segmentation"]["counts"].encode())
    return mask_utils.decode(seg).astype(bool)


def expand(input_ids: list[int]) -> list[int | str]:
    out: list[int | str] = []
    for t in input_ids:
        out += ["patch"] * N_IMG if t == IMAGE_TOKEN_INDEX else [t]
    return out


def test_gcg_batch_contract_and_masks(run_output, tok) -> None:
    ds = dataset(run_output, tok, "gcg", convert=ConvertOptions(short_gcg=False))  # the dense caption
    items = list(ds)
    items.sort(key=lambda i: i.image_path)
    assert [i.image_path for i in items] == ["sa_000000/sa_1.jpg", "sa_000001/sa_3.jpg"]
    assert ds.counts["images:size_mismatch"] == 1 and ds.counts["images:missing"] == 1
    assert ds.counts["rows:error"] == 1 and ds.counts["items:ok"] == 2
    batch = Collator.for_tokenizer(tok)(items)
    assert set(batch) == BATCH_KEYS
    assert (
        batch["global_enc_images"].shape == (2, 3, CLIP, CLIP)
        and batch["global_enc_images"].dtype == torch.uint8
    )
    # Normalised on the device: the CLIP input becomes float, the SAM padding stays exactly 0.
    assert normalise_clip(batch["global_enc_images"]).dtype == torch.float32
    sam_in = normalise_sam(batch["grounding_enc_images"], batch["resize_list"])
    assert sam_in.dtype == torch.float32 and sam_in[:, :, 43:].abs().sum() == 0
    assert sam_in[:, :, :43].abs().sum() > 0
    assert batch["grounding_enc_images"].shape == (2, 3, SAM, SAM)
    assert batch["resize_list"] == [(43, 64), (43, 64)]  # 400 x 600 with the long side at 64
    assert batch["grounding_enc_images"][:, :, 43:].abs().sum() == 0  # padded bottom-right with zeros
    assert batch["bboxes"] is None and batch["inference"] is False
    assert batch["offset"].tolist() == [0, 1, 2] and batch["has_grounding"].tolist() == [True, True]
    ids, labels, attn = batch["input_ids"], batch["labels"], batch["attention_masks"]
    assert ids.dtype == labels.dtype == torch.long and attn.dtype == torch.bool and ids.shape == labels.shape
    assert (labels[~attn] == IGNORE_INDEX).all() and (ids[~attn] == SpecialIds.of(tok).pad).all()
    row = _row("sa_1", "sa_000000")
    want = np.stack([rle_of(row, 1) | rle_of(row, 3), rle_of(row, 2)]).astype(np.float32)
    seg = SpecialIds.of(tok).seg
    for b in range(2):
        masks = batch["masks_list"][b]
        assert masks.shape == (2, H, W) and masks.dtype == torch.uint8
        assert np.array_equal(masks.numpy(), want)
        assert batch["sampled_classes_list"][b] == ["white cup", "a wooden table"]
        assert batch["label_list"][b].shape == (H, W) and (batch["label_list"][b] == IGNORE_LABEL).all()
        expanded = expand(ids[b][attn[b]].tolist())
        assert [expanded[p + 1] for p in batch["seg_positions"][b].tolist()] == [seg, seg]
        assert "<p> white cup </p> [SEG]" in batch["conversation_list"][b]


@pytest.mark.parametrize(
    ("mode", "cup", "table"),
    [
        # pad: the 400 x 600 image sits 100 px down a 600 px square.
        ("pad", [100 / 600, 200 / 600, 200 / 600, 300 / 600], [0, 250 / 600, 1, 500 / 600]),
        # center_crop: 400 -> 32, 600 -> 48, 8 px cut on each side.
        ("center_crop", [0, 0.25, 0.25, 0.5], [0, 0.375, 1, 1]),
    ],
)
def test_region_boxes_are_mapped_into_the_clip_frame(run_output, tok, mode, cup, table) -> None:
    items = list(dataset(run_output, tok, "region", preprocess=mode))
    batch = Collator.for_tokenizer(tok)(items)
    assert batch["grounding_enc_images"] is None and all(m.shape == (0, H, W) for m in batch["masks_list"])
    for boxes in batch["bboxes"]:
        assert boxes.dtype == torch.float32
        np.testing.assert_allclose(boxes.numpy(), np.array([cup, table]), atol=1e-6)


def test_whole_image_box_and_an_object_land_where_they_should() -> None:
    h, w = 40, 80
    whole = np.array([[0, 0, w, h]])
    np.testing.assert_allclose(clip_frame(h, w, CLIP, "pad").boxes(whole), [[0, 0.25, 1, 0.75]])
    np.testing.assert_allclose(clip_frame(h, w, CLIP, "center_crop").boxes(whole), [[0, 0, 1, 1]])
    image = np.zeros((h, w, 3), np.uint8)
    image[10:30, 44:60] = 255
    for mode in ("pad", "center_crop"):
        tensor, frame = clip_image(image, CLIP, mode)
        assert tensor.dtype == torch.uint8
        pixels = tensor.float() / 255
        x1, y1, x2, y2 = (frame.boxes(np.array([[44, 10, 60, 30]]))[0] * CLIP).round().astype(int)
        inside = pixels[:, y1 + 1 : y2 - 1, x1 + 1 : x2 - 1]
        assert inside.min() > 0.9, mode
        outside = pixels.clone()
        outside[:, max(y1 - 1, 0) : y2 + 1, max(x1 - 1, 0) : x2 + 1] = 0
        assert outside.max() < 0.6, mode
    grounding, resized = sam_image(image, 64)
    assert resized == (32, 64) and grounding.shape == (3, 64, 64) and grounding[:, 32:].abs().sum() == 0


def test_mixed_task_batches_are_legal(run_output, tok) -> None:
    dense = ConvertOptions(short_gcg=False)
    items = [
        next(iter(dataset(run_output, tok, t, convert=dense))) for t in ("gcg", "region", "caption", "refseg")
    ]
    batch = Collator.for_tokenizer(tok)(items)
    assert batch["tasks"] == ["gcg", "region", "caption", "refseg"]
    assert batch["has_grounding"].tolist() == [True, False, False, True]
    assert batch["grounding_enc_images"][[1, 2]].abs().sum() == 0
    assert [b.shape[0] for b in batch["bboxes"]] == [0, 2, 0, 0]
    assert [m.shape[0] for m in batch["masks_list"]] == [2, 0, 0, 2]
    assert [len(p) for p in batch["seg_positions"]] == [2, 0, 0, 2]


def test_collate_refuses_a_seg_mask_mismatch_naming_the_image(run_output, tok) -> None:
    item = next(iter(dataset(run_output, tok, "gcg", convert=ConvertOptions(short_gcg=False))))
    bad = replace(item, masks=item.masks[:1])
    with pytest.raises(ValueError, match=rf"{item.image_path}.*2 \[SEG\].*1 mask"):
        Collator.for_tokenizer(tok)([bad])
    region = next(iter(dataset(run_output, tok, "region")))
    with pytest.raises(ValueError, match="<bbox>"):
        Collator.for_tokenizer(tok)([replace(region, bboxes=region.bboxes[:1])])


def test_truncation_that_would_cut_a_seg_drops_the_item(run_output, tok) -> None:
    items = list(dataset(run_output, tok, "refseg"))
    assert [len(i.seg_positions) for i in items] == [2, 2]  # two objects with masks, two rounds
    shortest = min(len(i.input_ids) for i in items) + N_IMG - 1
    ds = dataset(run_output, tok, "refseg", max_length=shortest - 1)
    assert list(ds) == [] and ds.counts["tokens:truncated_seg"] == 2


def test_split_by_rank_and_worker_at_shard_granularity(run_output, tok) -> None:
    out = str(run_output[0])
    ranks = [GrandGlammDataset(out, tok, config("caption"), rank=r, world_size=2) for r in (0, 1)]
    shards = [ds.shards() for ds in ranks]
    # The split is over committed units (the store's keys): here one unit per shard.
    expected = [unit_id("sa_000000", 0), unit_id("sa_000001", 0)]
    assert sorted(shards[0] + shards[1]) == expected and all(len(s) == 1 for s in shards)
    together = sorted(i.image_path for ds in ranks for i in ds)
    assert together == ["sa_000000/sa_1.jpg", "sa_000001/sa_3.jpg"]
    # The same seed and epoch give the same items on a rerun; the DataLoader's workers split shards.
    ds = dataset(run_output, tok)
    first = sorted((i.image_path, i.task, i.conversation) for i in ds)
    assert first == sorted((i.image_path, i.task, i.conversation) for i in ds)
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=Collator.for_tokenizer(tok))
    assert sorted(p for batch in loader for p in batch["image_paths"]) == [p for p, _, _ in first]


def test_images_override_and_missing_run_metadata(run_output, tok, tmp_path) -> None:
    out, images = run_output
    bare = tmp_path / "copy"
    commit(bare, 3, "sa_000001", [_row("sa_3", "sa_000001")])
    with pytest.raises(StoreError, match="--images"):
        GrandGlammDataset(str(bare), tok, config("caption"))
    items = list(GrandGlammDataset(str(bare), tok, config("caption"), images_uri=str(images)))
    assert [i.image_path for i in items] == ["sa_000001/sa_3.jpg"]


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"preprocess": "squash"}, "preprocess"),
        ({"clip_size": 0}, "clip_size"),
        ({"task_weights": {"vqa": 1.0}}, "task_weights"),
        ({"max_length": 4}, "max_length"),
        ({"task_weights": {"gcg": 0.0}}, "task_weights"),
    ],
)
def test_data_config_errors_name_the_field(kw, field) -> None:
    with pytest.raises(DataConfigError, match=f"^{field}:"):
        DataConfig(num_image_tokens=N_IMG, **kw)


@pytest.mark.slow
def test_dataset_on_a_tiny_lite_run(tmp_path, tiny_cfg, tok) -> None:
    from typer.testing import CliRunner

    from grand_pipeline.cli import app
    from grand_pipeline.sample import make_sample

    make_sample(str(tmp_path / "in"), tiny_cfg, images=2, shard_id="sa_000040", start=1)
    result = CliRunner().invoke(
        app,
        [
            "run",
            "-i",
            str(tmp_path / "in"),
            "-o",
            str(tmp_path / "out"),
            "--profile",
            "tiny-lite",
            "--executor",
            "local",
            "--levels",
            "1-3",
        ],
    )
    assert result.exit_code == 0, result.output
    opts = ConvertOptions(methods=("exact", "embedding", "noun"), only_verified=False)
    ds = GrandGlammDataset(str(tmp_path / "out"), tok, config(convert=opts))
    items = list(ds)
    assert items, dict(ds.counts)
    batch = Collator.for_tokenizer(tok)(items)
    assert set(batch) == BATCH_KEYS and batch["global_enc_images"].shape[0] == len(items)
