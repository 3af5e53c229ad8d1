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

ROW = re.compile(r"^(?P<level>\d|all)\s+(?P<stage>\w+)\s+(?P<backends>\S+)?\s+(?P<load>\d+\.\d{2})\s+(?P<per>\d+\.\d{4})"
                 r"\s+(?P<kernel>\d+\.\d{4}|n/a)\s+(?P<busy>\d+\.\d|n/a)$")


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
    assert gpu_profile.main(["--tiny", "--images", "1", "--objects", "20", "30", "--force-stand-ins"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header = dict(item.split("=", 1) for item in lines[0].removeprefix("# gpu_profile ").split())
    assert header["mode"] == "tiny" and header["device"].startswith("cpu") and header["images"] == "1"
    assert 20 <= int(header["objects"].split("-")[0]) <= int(header["objects"].split("-")[1]) <= 30
    assert lines[1].split() == ["level", "stage", "backends", "load_s", "s_per_image", "kernel_s", "busy_%"]
    rows = [ROW.match(line) for line in lines[2:] if not line.startswith("# ")]
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
    # No CUDA kernels on a CPU: every row, level totals included, says n/a.
    assert all(m["kernel"] == "n/a" and m["busy"] == "n/a" for m in rows)
    assert any(line.startswith("# note: skipped llm") for line in lines)
    # --force-stand-ins: both stand-ins noted, and the phrases row names the regex splitter.
    notes = [line for line in lines if line.startswith("# note: stand-in ")]
    assert any("phrase_extractor (regex_phrases_standin)" in n and "used by 2/phrases" in n for n in notes), notes
    assert any("text_embedder (minilm_standin)" in n and "MiniLM-L6" in n for n in notes), notes
    assert stages[("2", "phrases")]["backends"] == "regex_phrases_standin"
    bound = [line for line in lines if line.startswith("# llm bound (transformers generate, ")]
    assert len(bound) == 1 and "tiny" in bound[0], bound
    assert re.search(r"batch 2, 16\+8 tokens\): \d+\.\d{2} s/prompt$", bound[0]), bound


def test_render_reports_kernel_time_and_busy_percent() -> None:
    rows = [{"level": 1, "stage": "tags", "backends": "clip_tagger", "load_s": 1.0, "per_image": 0.2,
             "kernel_per_image": 0.05},
            {"level": 1, "stage": "masks", "backends": "sam", "load_s": 2.0, "per_image": 0.8,
             "kernel_per_image": 0.6}]  # fmt: skip
    lines = gpu_profile.render(rows, {"device": "x"}, ["n"], ["# llm bound (x): 0.58 s/prompt"]).splitlines()
    parsed = {(m["level"], m["stage"]): m for m in map(ROW.match, lines[2:5])}
    assert parsed[("1", "tags")]["kernel"] == "0.0500" and parsed[("1", "tags")]["busy"] == "25.0"
    assert parsed[("1", "total")]["kernel"] == "0.6500" and parsed[("1", "total")]["busy"] == "65.0"
    assert lines[-2:] == ["# llm bound (x): 0.58 s/prompt", "# note: n"]


def test_cuda_kernel_seconds_sums_device_events_only() -> None:
    import types

    import torch

    def event(device_type, us):
        return types.SimpleNamespace(device_type=device_type, time_range=types.SimpleNamespace(elapsed_us=lambda: us))

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    assert gpu_profile.cuda_kernel_seconds([event(cuda, 1500.0), event(cpu, 9e6), event(cuda, 500.0)]) == 0.002


def test_regex_phrase_stand_in_keeps_offsets() -> None:
    from benchmarks import stand_ins

    text = "A man in a red shirt is holding the big dog, next to two wooden chairs."
    phrases = stand_ins.regex_phrases(text)
    assert [p.text for p in phrases] == ["man", "red shirt", "big dog", "wooden chairs"]
    assert all(text[p.start : p.end] == p.text for p in phrases)
    assert [p.root for p in phrases] == ["man", "shirt", "dog", "chairs"]


def test_minilm_stand_in_is_full_size_and_embeds(monkeypatch) -> None:
    import numpy as np

    from benchmarks import stand_ins
    from grand_pipeline.config import ModelSpec
    from grand_pipeline.models.roles import BACKENDS

    stand_ins._register()
    # Neither the package nor the Hugging Face cache: the word-level tokenizer of the same vocab.
    monkeypatch.setattr(stand_ins, "_TOKENIZER", None)
    monkeypatch.setattr(stand_ins, "MINILM_PACKAGE", "no_such_minilm_package")
    monkeypatch.setattr(stand_ins, "MINILM_HUB_ID", "/nonexistent/minilm")
    embedder = BACKENDS["text_embedder"].get(stand_ins.MINILM_BACKEND)(ModelSpec(stand_ins.MINILM_BACKEND, ""))
    assert "word-level" in embedder.model_id and len(embedder.tokenizer) == 30522
    config = embedder.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.intermediate_size, config.vocab_size) == (6, 384, 12, 1536, 30522)  # fmt: skip
    vectors = embedder.embed(["a red cup", "a dog on a table"])
    assert vectors.shape == (2, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)


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
