"""Inputs that cannot hurt: each hostile value is an error row for its own image, never a failed unit.

Unit-level checks of the readers and the annotation parser, and one end-to-end run with several
bad images next to a good one in a single shard.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image
from typer.testing import CliRunner

from grand_pipeline.engine.inputs import parse_regions
from grand_pipeline.sources import (
    ImageDecodeError,
    SourceError,
    decode_image,
    index_shard,
    iter_sa1b_tar,
    iter_shard,
    iter_unit_items,
    list_shards,
    write_sa1b_tar,
)
from tests.test_sources import _jpeg, _raw_tar, _ref, _sa1b_json

SMALL = skimage.data.astronaut()[::8, ::8].copy()  # 64 x 64: enough for every reader and level 1


@pytest.fixture(scope="module")
def good() -> tuple[bytes, dict]:
    return _jpeg(SMALL), _sa1b_json("sa_1", SMALL)


def _with(meta: dict, **ann_changes) -> dict:
    """A deep copy of ``meta`` whose first annotation has these fields replaced."""
    out = json.loads(json.dumps(meta))
    out["annotations"][0].update(ann_changes)
    return out


# ---------------------------------------------------------------- 1. hostile annotation values


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"bbox": []}, "invalid SA-1B annotation 1: bbox must have 4 numbers, got []"),
        ({"bbox": [0, 0, int("9" * 400), 1]}, "bbox must have 4 finite numbers: number out of range"),
        ({"bbox": [0, 0, float("nan"), 1]}, "bbox must have 4 finite numbers: number is not finite"),
        ({"bbox": [0, True, 1, 1]}, "bbox must have 4 finite numbers: not a number: True"),
        ({"bbox": [0, 0, -3, 1]}, "bbox width/height must be >= 0"),
        ({"predicted_iou": int("9" * 400)}, "number out of range: <integer with more than 40 digits>"),
        ({"segmentation": {"size": [float("inf"), 64], "counts": "x"}}, "size must be 2 positive integers"),
        ({"segmentation": {"size": [64], "counts": "x"}}, "size must be 2 positive integers, got [64]"),
        ({"segmentation": {"size": [64, 64]}}, "missing segmentation {size, counts}"),
        ({"segmentation": {"size": [64, 64], "counts": [int("9" * 400)]}}, "invalid SA-1B annotation 1: "),
    ],
)
def test_hostile_annotation_values_are_value_errors(good, change, message):
    """Each of these raised IndexError/OverflowError/... which failed the whole unit on every retry."""
    ann = _with(good[1], **change)["annotations"]
    with pytest.raises(ValueError) as info:
        parse_regions(ann, 64, 64)
    assert message in str(info.value) and len(str(info.value)) < 300


def test_a_valid_annotation_still_parses(good):
    (region,) = parse_regions(good[1]["annotations"], 64, 64)
    assert (
        region.rle["size"] == [64, 64] and region.bbox.shape == (4,) and region.score == pytest.approx(0.93)
    )


def _tar_of(path: Path, pairs: list[tuple[str, bytes, bytes]]) -> Path:
    return _raw_tar(
        path, [m for stem, jpg, meta in pairs for m in ((f"{stem}.jpg", jpg), (f"{stem}.json", meta))]
    )


def test_hostile_json_is_an_error_row_next_to_a_good_image(tmp_path, good):
    jpeg, meta = good
    deep = b"[" * 200_000 + b"]" * 200_000
    huge = json.dumps({**meta, "image": {**meta["image"], "width": int("9" * 400)}}).encode()
    nested = b'{"image": {"width": 64, "height": 64}, "annotations": [' + deep + b"]}"
    tar = _tar_of(
        tmp_path / "s.tar",
        [
            ("sa_1", jpeg, json.dumps(meta).encode()),
            ("sa_2", jpeg, deep),
            ("sa_3", jpeg, huge),
            ("sa_4", jpeg, nested),
        ],
    )
    got = {g.image_id: g.error for g in iter_sa1b_tar(_ref(str(tar)))}
    assert got == {
        "sa_1": None,
        "sa_2": "bad SA-1B json: JSON nested too deeply",
        "sa_3": "bad SA-1B json: image.width/height are not positive integers below 2**31: "
        "<integer with more than 40 digits> x 64",
        "sa_4": "bad SA-1B json: JSON nested too deeply",
    }


# ---------------------------------------------------------------- 5. deterministic decode errors


def test_decode_errors_are_deterministic_and_carry_no_address():
    good = _jpeg(SMALL)
    cases = {b"": "empty file (0 bytes)", b"\xff\xd8garbage": None, good[:200] + b"\x00" * 500: None}
    for data, expected in cases.items():
        texts = set()
        for _ in range(2):
            with pytest.raises(ImageDecodeError) as info:
                decode_image(data, max_pixels=10_000_000)
            texts.add(str(info.value))
        (text,) = texts  # the same message both times
        assert "0x" not in text and "object at" not in text, text
        assert expected is None or text == expected


# ---------------------------------------------------------------- 6. symlinked inputs


def test_symlinked_tar_in_a_folder_is_listed_and_read(tmp_path, good):
    jpeg, meta = good
    elsewhere = tmp_path / "store" / "sa_000007.tar"
    write_sa1b_tar(str(elsewhere), [("sa_1", jpeg, meta)])
    folder = tmp_path / "in"
    folder.mkdir()
    write_sa1b_tar(str(folder / "sa_000001.tar"), [("sa_2", jpeg, _sa1b_json("sa_2", SMALL))])
    os.symlink(elsewhere, folder / "sa_000007.tar")
    refs = list_shards(str(folder))
    assert [r.shard_id for r in refs] == ["sa_000001", "sa_000007"]
    assert [(g.image_id, g.error) for g in iter_shard(refs[1])] == [("sa_1", None)]


def test_symlinked_images_are_read_and_broken_links_reported(tmp_path, caplog):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "real.jpg").write_bytes(_jpeg(SMALL))
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(_jpeg(SMALL))
    os.symlink(photos / "real.jpg", folder / "b.jpg")
    os.symlink(photos / "gone.jpg", folder / "c.jpg")
    os.symlink(photos / "gone2.jpg", folder / "d.jpg")
    with caplog.at_level(logging.WARNING, logger="grand_pipeline.sources"):
        (ref,) = list_shards(str(folder))
    assert [(g.image_id, g.error) for g in iter_shard(ref)] == [("a", None), ("b", None)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 2 broken symlink(s), e.g. c.jpg" in warnings[0]


def test_a_folder_of_only_broken_symlinks_says_so(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    os.symlink(tmp_path / "nowhere.tar", folder / "sa_1.tar")
    with pytest.raises(SourceError, match=r"no shards in .*; skipped 1 broken symlink\(s\)$"):
        list_shards(str(folder))


# ---------------------------------------------------------------- 8. odd members inside a tar


def test_traversal_name_never_merges_with_the_real_image(tmp_path, good):
    jpeg, meta = good
    blob = json.dumps(meta).encode()
    for order in (1, -1):  # the hostile pair before and after the real one
        members = [
            ("sa_1.jpg", jpeg),
            ("sa_1.json", blob),
            ("../../sa_1.jpg", b"evil"),
            ("../../sa_1.json", blob),
        ]
        got = list(iter_sa1b_tar(_ref(str(_raw_tar(tmp_path / f"t{order}.tar", members[::order])))))
        real = [g for g in got if g.image_id == "sa_1"]
        assert len(real) == 1 and real[0].error is None and real[0].data == jpeg
        (evil,) = [g for g in got if g.image_id != "sa_1"]
        assert evil.image_id.startswith("unsafe-") and evil.error == "unsafe member name '../../sa_1'"


def test_png_members_are_images_like_in_an_image_folder(tmp_path, good):
    _, meta = good
    buf = io.BytesIO()
    Image.fromarray(SMALL).save(buf, "PNG")
    tar = _raw_tar(
        tmp_path / "p.tar", [("sa_1.png", buf.getvalue()), ("sa_1.json", json.dumps(meta).encode())]
    )
    (item,) = iter_sa1b_tar(_ref(str(tar)))
    assert item.error is None and item.file_name == "sa_1.png"
    assert np.array_equal(decode_image(item.data, 10_000_000), SMALL)


def test_duplicate_ids_stay_unique_and_units_agree_with_the_index(tmp_path, good):
    jpeg, meta = good
    blob = json.dumps(meta).encode()
    # A real member already named like a generated id: the generated one takes the next number,
    # and a real one arriving after a generated id of that name is itself a duplicate.
    members = [
        ("sa_1.jpg", jpeg), ("sa_1.json", blob),
        ("sa_1__dup1.jpg", jpeg), ("sa_1__dup1.json", blob),
        ("a/sa_1.jpg", b"second"),  # -> sa_1__dup2
        ("sa_1__dup2.json", blob),  # -> sa_1__dup2__dup1
    ]  # fmt: skip
    ref = _ref(str(_raw_tar(tmp_path / "d.tar", members)))
    got = list(iter_sa1b_tar(ref))
    ids = [g.image_id for g in got]
    assert ids == ["sa_1", "sa_1__dup1", "sa_1__dup2", "sa_1__dup2__dup1"] and len(set(ids)) == len(ids)
    assert [g.error is None for g in got] == [True, True, False, False]
    assert "duplicate member 'a/sa_1.jpg': sa_1 already has an image" in got[2].error
    index_ids, offsets = index_shard(ref)
    assert index_ids == ids
    # A unit that holds only a duplicate's id reads it (from the top: it has no offset to seek to).
    assert offsets is not None and offsets[2] == -1
    (only,) = iter_unit_items(ref, ["sa_1__dup2"])
    assert only.error == got[2].error


# ---------------------------------------------------------------- end to end: one shard, several bad images


def test_bad_images_are_error_rows_and_the_unit_commits(tmp_path, good):
    from grand_pipeline.cli import app

    jpeg, meta = good
    blob = json.dumps(meta).encode()
    size_inf = json.dumps(meta).replace('"size": [64, 64]', '"size": [Infinity, 64]')
    assert "Infinity" in size_inf
    members = [
        ("sa_1.jpg", jpeg), ("sa_1.json", blob),
        ("sa_2.jpg", jpeg), ("sa_2.json", json.dumps(_with(meta, bbox=[])).encode()),
        ("sa_3.jpg", jpeg), ("sa_3.json", size_inf.encode()),
        ("sa_4.jpg", jpeg), ("sa_4.json", b"[" * 200_000 + b"]" * 200_000),
        ("sa_5.jpg", b""), ("sa_5.json", blob),
        ("x/sa_1.jpg", jpeg),
        ("../../sa_1.jpg", jpeg), ("../../sa_1.json", blob),
    ]  # fmt: skip
    folder = tmp_path / "in"
    folder.mkdir()
    _raw_tar(folder / "sa_000003.tar", members)
    out = tmp_path / "out"
    args = ["run", "-i", str(folder), "-o", str(out), "--profile", "tiny-lite", "--executor", "local"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = {r["image_id"]: r for r in pq.read_table(out / "level1" / "sa_000003@00000.parquet").to_pylist()}
    errors = {k: r["error"] for k, r in rows.items() if k.startswith("sa_") and k != "sa_1"}
    assert rows["sa_1"]["status"] == "ok" and rows["sa_1"]["error"] is None
    assert errors == {
        "sa_2": "invalid SA-1B annotation 1: bbox must have 4 numbers, got []",
        "sa_3": "invalid SA-1B annotation 1: segmentation size must be 2 positive integers, got [inf, 64]",
        "sa_4": "bad SA-1B json: JSON nested too deeply",
        "sa_5": "empty file (0 bytes)",
        "sa_1__dup1": "duplicate member 'x/sa_1.jpg': sa_1 already has an image; the first one is kept",
    }
    (unsafe,) = [r for k, r in rows.items() if k.startswith("unsafe-")]
    assert unsafe["error"] == "unsafe member name '../../sa_1'"
    marker = json.loads((out / "level1" / "sa_000003@00000.success.json").read_text())
    assert marker["rows"] == 7 and marker["ok"] == 1 and marker["failed"] == 6
