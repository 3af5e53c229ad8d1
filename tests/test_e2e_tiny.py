"""End to end with the tiny profile: real loaders, random weights, real commit protocol."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from grand_pipeline.cli import app
from grand_pipeline.sample import make_sample
from grand_pipeline.schemas import level_schema

runner = CliRunner()


def grand(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory, tiny_cfg) -> Path:
    folder = tmp_path_factory.mktemp("input")
    make_sample(str(folder), tiny_cfg, images=3, shard_id="sa_000000", start=1)
    make_sample(str(folder), tiny_cfg, images=2, shard_id="sa_000001", start=4)
    return folder


def test_sample_is_sa1b_format(sample_dir: Path) -> None:
    with tarfile.open(sample_dir / "sa_000000.tar") as tar:
        names = tar.getnames()
        assert names == ["sa_1.jpg", "sa_1.json", "sa_2.jpg", "sa_2.json", "sa_3.jpg", "sa_3.json"]
        meta = json.load(tar.extractfile("sa_1.json"))
    assert meta["image"] == {"image_id": 1, "width": 512, "height": 512, "file_name": "sa_1.jpg"}
    for ann in meta["annotations"]:
        assert set(ann) >= {"id", "bbox", "area", "segmentation", "predicted_iou", "stability_score"}
        assert ann["segmentation"]["size"] == [512, 512]


def test_local_run_commits_level1(sample_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = grand("run", "-i", str(sample_dir), "-o", str(out), "--profile", "tiny-lite", "--executor", "local")
    assert result.exit_code == 0, result.output
    for shard, rows in (("sa_000000", 3), ("sa_000001", 2)):
        table = pq.read_table(out / "level1" / f"{shard}@00000.parquet")
        assert table.schema.equals(level_schema(1), check_metadata=False)
        assert table.num_rows == rows
        marker = json.loads((out / "level1" / f"{shard}@00000.success.json").read_text())
        assert marker["rows"] == rows and marker["ok"] + marker["failed"] == rows
        assert set(marker["stage_seconds"]) >= {"tags", "detect", "vote", "masks", "depth"}
    row = pq.read_table(out / "level1" / "sa_000000@00000.parquet").to_pylist()[0]
    assert row["status"] == "ok" and row["error"] is None
    used = {(b["stage"], b["backend"], b["heuristic"]) for b in row["provenance"]["backends"]}
    assert ("detect", "nanodet_onnx", False) in used
    assert ("depth", "ground_plane", True) in used
    assert row["depth_source"].endswith("(heuristic)")
    # Every object leaves level 1 with a mask of the image's size, and the low-res depth map that
    # level 2 reads depths from (longest side 64 cells for the 512x512 sample).
    for obj in row["objects"] + row["floating_objects"]:
        assert obj["segmentation"]["size"] == [row["height"], row["width"]]
    lowres = row["depth_lowres"]
    assert (lowres["height"], lowres["width"]) == (64, 64) and len(lowres["values"]) == 64 * 64
    run_meta = json.loads((out / "_run" / "run.json").read_text())
    assert run_meta["config_hash"] == row["provenance"]["config_hash"]
    assert len(run_meta["models"]["segmenter"]["weights"]) == 64
    assert (out / "_run" / "config.yaml").exists()


def test_rerun_is_a_no_op_and_level2_needs_its_level(sample_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["run", "-i", str(sample_dir), "-o", str(out), "--profile", "tiny-lite", "--executor", "local"]
    assert grand(*args).exit_code == 0
    marker = out / "level1" / "sa_000000@00000.success.json"
    before = marker.read_bytes()
    again = grand(*args)
    assert again.exit_code == 0
    assert "nothing to do" in again.output
    assert marker.read_bytes() == before
    bad = grand("run", "-i", str(sample_dir), "-o", str(out), "--profile", "tiny-lite", "--level", "7")
    assert bad.exit_code == 2
    assert "level 7 is not available" in bad.output


def test_overwrite_recommits_identical_content(sample_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["run", "-i", str(sample_dir), "-o", str(out), "--profile", "tiny-lite", "--executor", "local"]
    assert grand(*args).exit_code == 0
    first = (out / "level1" / "sa_000001@00000.parquet").read_bytes()
    attempt = json.loads((out / "level1" / "sa_000001@00000.success.json").read_text())["attempt"]
    assert grand(*args, "--mode", "overwrite").exit_code == 0
    assert (out / "level1" / "sa_000001@00000.parquet").read_bytes() == first
    assert json.loads((out / "level1" / "sa_000001@00000.success.json").read_text())["attempt"] > attempt


def _broken_shard(folder: Path, sample_dir: Path) -> Path:
    """A copy of the sample with a corrupt JPEG, a bad RLE and a JPEG without its JSON."""
    members = {}
    with tarfile.open(sample_dir / "sa_000000.tar") as tar:
        for member in tar.getmembers():
            members[member.name] = tar.extractfile(member).read()
    members["sa_1.jpg"] = members["sa_1.jpg"][:200] + b"\x00" * 500
    meta = json.loads(members["sa_2.json"])
    meta["annotations"].append({"id": 999, "bbox": [0, 0, 5, 5], "segmentation": {"size": [512, 512], "counts": "!!"}})
    members["sa_2.json"] = json.dumps(meta).encode()
    del members["sa_3.json"]
    path = folder / "sa_000009.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_bad_inputs_become_error_rows_and_the_shard_commits(sample_dir, tmp_path) -> None:
    broken = _broken_shard(tmp_path, sample_dir)
    out = tmp_path / "out"
    result = grand("run", "-i", str(broken), "-o", str(out), "--profile", "tiny-lite", "--executor", "local")
    assert result.exit_code == 0, result.output
    rows = {r["image_id"]: r for r in pq.read_table(out / "level1" / "sa_000009@00000.parquet").to_pylist()}
    assert set(rows) == {"sa_1", "sa_2", "sa_3"}
    assert rows["sa_1"]["status"] == "error" and rows["sa_1"]["error_stage"] == "decode"
    assert rows["sa_2"]["status"] == "error" and "annotation 999" in rows["sa_2"]["error"]
    assert rows["sa_3"]["status"] == "error" and "json" in rows["sa_3"]["error"].lower()
    marker = json.loads((out / "level1" / "sa_000009@00000.success.json").read_text())
    assert marker["failed"] == 3 and marker["failures_by_stage"] == {"decode": 1, "read": 2}
    status = json.loads(grand("status", "-o", str(out), "--json").output)
    assert status["levels"][0]["images_failed"] == 3


def test_show_renders_a_png(sample_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert grand("run", "-i", str(sample_dir), "-o", str(out), "--profile", "tiny-lite", "--executor", "local").exit_code == 0
    png = tmp_path / "sa_2.png"
    result = grand("show", "-o", str(out), "--image", "sa_2", "--to", str(png))
    assert result.exit_code == 0, result.output
    with Image.open(png) as img:
        assert img.width == 600 and img.height > 400
    missing = grand("show", "-o", str(out), "--image", "sa_404", "--to", str(png))
    assert missing.exit_code == 2 and "not found" in missing.output


def test_user_errors_are_one_line(tmp_path: Path) -> None:
    cases = [
        (["run", "-i", str(tmp_path / "nope"), "-o", str(tmp_path / "o")], "does not exist"),
        (["run", "-i", str(tmp_path), "-o", str(tmp_path / "o"), "--profile", "huge"], "unknown profile"),
        (["run", "-i", str(tmp_path), "-o", str(tmp_path / "o"), "--set", "level1.vote_iou=2"], "level1.vote_iou"),
    ]
    for args, text in cases:
        result = grand(*args)
        assert result.exit_code == 2, result.output
        assert text in result.output
        assert "Traceback" not in result.output
