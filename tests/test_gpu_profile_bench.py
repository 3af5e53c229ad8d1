"""The GPU profile benchmark: its full-size model configs, and its table (``--tiny`` on the CPU)."""

from __future__ import annotations

import re

import pytest

from benchmarks import full_models, gpu_profile

#: Published parameter counts (millions) of the checkpoints full.yaml names; 2% tolerance.
PUBLISHED_M = {
    "clip_tagger": 428,  # openai/clip-vit-large-patch14
    "blip2": 3745,  # Salesforce/blip2-opt-2.7b
    "llava": 7063,  # llava-hf/llava-1.5-7b-hf
    "owlv2": 155,  # google/owlv2-base-patch16-ensemble
    "hf_depth": 335,  # Depth-Anything-V2-Large
    "sam": 641,  # sam_vit_h_4b8939
    "grounding_dino": 233,  # IDEA-Research/grounding-dino-base
}

ROW = re.compile(r"^(?P<level>\d|all)\s+(?P<stage>\w+)\s+(?P<backends>\S+)?\s+(?P<load>\d+\.\d{2})\s+(?P<per>\d+\.\d{4})$")


@pytest.mark.parametrize("backend", sorted(PUBLISHED_M))
def test_full_size_configs_match_the_published_checkpoints(backend: str) -> None:
    millions = full_models.parameter_count(backend) / 1e6
    assert abs(millions - PUBLISHED_M[backend]) / PUBLISHED_M[backend] < 0.02, millions


def test_synthetic_images_have_the_requested_objects_inside_the_frame() -> None:
    import numpy as np

    image, boxes = gpu_profile.synthetic_image(np.random.default_rng(0), 37)
    assert image.shape == (1500, 2250, 3) and image.dtype == np.uint8 and len(boxes) == 37
    arr = np.asarray(boxes)
    assert (arr[:, 0] >= 0).all() and (arr[:, 2] <= 2250).all() and (arr[:, 3] <= 1500).all()
    assert (arr[:, 2:] > arr[:, :2]).all()


@pytest.mark.slow
def test_tiny_run_prints_the_documented_table(capsys) -> None:
    assert gpu_profile.main(["--tiny", "--images", "1", "--objects", "20", "30"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header = dict(item.split("=", 1) for item in lines[0].removeprefix("# gpu_profile ").split())
    assert header["mode"] == "tiny" and header["device"].startswith("cpu") and header["images"] == "1"
    assert 20 <= int(header["objects"].split("-")[0]) <= int(header["objects"].split("-")[1]) <= 30
    assert lines[1].split() == ["level", "stage", "backends", "load_s", "s_per_image"]
    rows = [ROW.match(line) for line in lines[2:] if not line.startswith("# note:")]
    assert all(rows), [line for line, m in zip(lines[2:], rows, strict=False) if not m]
    stages = {(m["level"], m["stage"]): m for m in rows}
    for level, names in ((1, ("tags", "detect", "vote", "masks", "attributes", "depth")),
                         (2, ("captions", "phrases", "grounding", "labels", "landmark"))):  # fmt: skip
        per = [float(stages[(str(level), n)]["per"]) for n in names]
        assert all(p >= 0 for p in per) and sum(per) > 0
        level_total = float(stages[(str(level), "total")]["per"])
        assert level_total == pytest.approx(sum(float(m["per"]) for (lv, s), m in stages.items()
                                                if lv == str(level) and s != "total"), abs=1e-3)  # fmt: skip
    assert stages[("1", "masks")]["backends"] == "sam" and stages[("2", "captions")]["backends"] == "blip2"
    assert any(line.startswith("# note: skipped llm") for line in lines)


def test_full_size_rtdetr_folder_loads_through_the_ultralytics_backend(tmp_path) -> None:
    import torch

    import grand_pipeline.models.backends  # noqa: F401
    from grand_pipeline.config import ModelSpec
    from grand_pipeline.models.roles import BACKENDS

    folder = full_models.ultralytics_model(tmp_path / "rtdetr", "cpu", torch.float32, "rtdetr")
    state = torch.load(folder / "weights.pt", weights_only=True)
    assert abs(sum(v.numel() for v in state.values()) / 1e6 - 67) < 2  # rtdetr-x: 67M parameters
    backend = BACKENDS["detector"].get("ultralytics")(ModelSpec("ultralytics", str(folder)))
    assert backend.family == "rtdetr"
