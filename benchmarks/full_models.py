"""Full-size, randomly initialised copies of the ``full`` profile's models, for ``gpu_profile``.

Each builder writes one model folder (or SAM ``.pth``) with the exact architecture hyper-
parameters of the checkpoint ``full.yaml`` names, random weights, and an offline tokenizer /
image processor with the real input sizes; the backend then loads it through its production
loader. Nothing is downloaded, so timings are those of the real networks without their weights.

``BUILDERS[backend](folder, spec, device)`` returns the path to put in ``spec.model``;
``parameter_count`` builds a model on the ``meta`` device (no memory) to report its size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from grand_pipeline.models import hf_common

logger = logging.getLogger(__name__)

#: openai/clip-vit-large-patch14: the tagger, label assigner and landmark classifier.
CLIP_L14 = {
    "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                    "num_attention_heads": 12, "vocab_size": 49408, "max_position_embeddings": 77,
                    "pad_token_id": 1, "bos_token_id": 49406, "eos_token_id": 2},
    "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                      "num_attention_heads": 16, "image_size": 224, "patch_size": 14},
    "projection_dim": 768,
}  # fmt: skip
#: Salesforce/blip2-opt-2.7b (EVA ViT-g, 32 queries, OPT-2.7B).
BLIP2_OPT27 = {
    "vision_config": {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39,
                      "num_attention_heads": 16, "image_size": 224, "patch_size": 14},
    "qformer_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                       "num_attention_heads": 12, "encoder_hidden_size": 1408, "vocab_size": 30522},
    "text_config": {"model_type": "opt", "hidden_size": 2560, "ffn_dim": 10240, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "vocab_size": 50304, "word_embed_proj_dim": 2560,
                    "max_position_embeddings": 2048},
    "num_query_tokens": 32,
}  # fmt: skip
#: llava-hf/llava-1.5-7b-hf (CLIP ViT-L/14-336 + Llama-2-7B).
LLAVA_15_7B = {
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                      "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336,
                      "patch_size": 14, "projection_dim": 768},
    "text_config": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
                    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                    "vocab_size": 32064, "max_position_embeddings": 4096},
}  # fmt: skip
#: google/owlv2-base-patch16-ensemble.
OWLV2_B16 = {
    "text_config": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                    "num_attention_heads": 8, "vocab_size": 49408, "max_position_embeddings": 16,
                    "pad_token_id": 0, "bos_token_id": 49406, "eos_token_id": 49407},
    "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "image_size": 960, "patch_size": 16},
    "projection_dim": 512,
}  # fmt: skip
#: depth-anything/Depth-Anything-V2-Large-hf (DINOv2-L backbone, DPT head).
DEPTH_ANYTHING_V2_L = {
    "backbone_config": {"model_type": "dinov2", "hidden_size": 1024, "num_hidden_layers": 24,
                        "num_attention_heads": 16, "intermediate_size": 4096, "image_size": 518,
                        "patch_size": 14, "out_indices": [5, 12, 18, 24], "reshape_hidden_states": False,
                        "layerscale_value": 1.0},
    "patch_size": 14, "reassemble_hidden_size": 1024, "neck_hidden_sizes": [256, 512, 1024, 1024],
    "fusion_hidden_size": 256, "head_hidden_size": 32,
}  # fmt: skip
#: IDEA-Research/grounding-dino-base (Swin-B 384 backbone, BERT-base text encoder, 900 queries).
GROUNDING_DINO_B = {
    "backbone_config": {"model_type": "swin", "embed_dim": 128, "depths": [2, 2, 18, 2],
                        "num_heads": [4, 8, 16, 32], "window_size": 12, "image_size": 384,
                        "out_features": ["stage2", "stage3", "stage4"]},
    "text_config": {"model_type": "bert", "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
                    "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512},
    "d_model": 256, "num_queries": 900, "max_text_len": 256, "encoder_layers": 6, "decoder_layers": 6,
}  # fmt: skip
#: openai/clip-vit-base-patch32: YOLO-World's text tower.
CLIP_B32 = {
    "text_config": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                    "num_attention_heads": 8, "vocab_size": 49408, "max_position_embeddings": 77,
                    "pad_token_id": 1, "bos_token_id": 49406, "eos_token_id": 2},
    "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "image_size": 224, "patch_size": 32},
    "projection_dim": 512,
}  # fmt: skip
#: ultralytics architecture yaml + scale of each full-profile member (ultralytics ships the yamls).
ULTRALYTICS = {"rtdetr": ("rtdetr-x.yaml", "x"), "yoloworld": ("yolov8x-worldv2.yaml", "x"), "yolo": ("yolo11x.yaml", "x")}


def _save(model: torch.nn.Module, processor: Any, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    hf_common.save_pretrained(folder, model, processor)  # safetensors, transformers' default
    return folder


def _make(cls: Any, config: Any, device: str, dtype: torch.dtype) -> torch.nn.Module:
    # Built directly on the device in the target dtype: a 7B model initialised on the CPU in
    # float32 would take minutes and 28 GB of host memory before the benchmark measured anything.
    with torch.device(device):
        return cls._from_config(config, dtype=dtype).eval()


def clip_model(folder: Path, device: str, dtype: torch.dtype, arch: dict[str, Any] = CLIP_L14) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from grand_pipeline.models.vision_common import word_tokenizer

    tok = word_tokenizer(
        {"<|pad|>": 1, "<|unk|>": 0, "<|startoftext|>": 49406, "<|endoftext|>": -1},
        pad="<|pad|>", unk="<|unk|>", bos="<|startoftext|>", eos="<|endoftext|>", size=49408,
    )  # fmt: skip
    model = _make(CLIPModel, CLIPConfig(**arch), device, dtype)
    image = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    return _save(model, CLIPProcessor(image_processor=image, tokenizer=tok), folder)


def blip2_model(folder: Path, device: str, dtype: torch.dtype) -> Path:
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    tok = hf_common.tiny_tokenizer(extra_special=("<image>",))
    text = {**BLIP2_OPT27["text_config"], "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}  # fmt: skip
    config = Blip2Config(**{**BLIP2_OPT27, "text_config": text},
                         image_token_index=tok.convert_tokens_to_ids("<image>"))  # fmt: skip
    model = _make(Blip2ForConditionalGeneration, config, device, dtype)
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": 224, "width": 224}), tokenizer=tok, num_query_tokens=32
    )
    return _save(model, processor, folder)


def llava_model(folder: Path, device: str, dtype: torch.dtype) -> Path:
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = hf_common.tiny_tokenizer(extra_special=("<image>",))
    text = {**LLAVA_15_7B["text_config"], "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}  # fmt: skip
    config = LlavaConfig(vision_config=LLAVA_15_7B["vision_config"], text_config=text,
                         image_token_index=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default")  # fmt: skip
    model = _make(LlavaForConditionalGeneration, config, device, dtype)
    image = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    processor = LlavaProcessor(image_processor=image, tokenizer=tok, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)  # fmt: skip
    return _save(model, processor, folder)


def owlv2_model(folder: Path, device: str, dtype: torch.dtype) -> Path:
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    from grand_pipeline.models.vision_common import word_tokenizer

    tok = word_tokenizer(
        {"!": 0, "<|unk|>": 1, "<|startoftext|>": 49406, "<|endoftext|>": -1},
        pad="!", unk="<|unk|>", bos="<|startoftext|>", eos="<|endoftext|>", size=49408,
    )  # fmt: skip
    tok.model_max_length = 16
    model = _make(Owlv2ForObjectDetection, Owlv2Config(**OWLV2_B16), device, dtype)
    processor = Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 960, "width": 960}), tokenizer=tok)
    return _save(model, processor, folder)


def _strip(arch: dict[str, Any]) -> dict[str, Any]:
    """A sub-config's kwargs: ``model_type`` only says which config class the builder uses."""
    return {k: v for k, v in arch.items() if k != "model_type"}


def _depth_anything_config() -> Any:
    from transformers import DepthAnythingConfig, Dinov2Config

    backbone = Dinov2Config(**_strip(DEPTH_ANYTHING_V2_L["backbone_config"]))
    return DepthAnythingConfig(**{**DEPTH_ANYTHING_V2_L, "backbone_config": backbone})


def _grounding_dino_config() -> Any:
    from grand_pipeline.models.backends.grounding_dino import make_config

    rest = {k: v for k, v in GROUNDING_DINO_B.items() if k not in ("backbone_config", "text_config")}
    backbone, text = _strip(GROUNDING_DINO_B["backbone_config"]), _strip(GROUNDING_DINO_B["text_config"])
    return make_config(backbone, text, **rest)


def depth_anything_model(folder: Path, device: str, dtype: torch.dtype) -> Path:
    from transformers import AutoModelForDepthEstimation, DPTImageProcessor

    with torch.device(device):
        model = AutoModelForDepthEstimation.from_config(_depth_anything_config(), dtype=dtype).eval()
    processor = DPTImageProcessor(
        size={"height": 518, "width": 518}, keep_aspect_ratio=True, ensure_multiple_of=14,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    )  # fmt: skip
    return _save(model, processor, folder)


def grounding_dino_model(folder: Path, device: str, dtype: torch.dtype) -> Path:
    from transformers import GroundingDinoForObjectDetection

    from grand_pipeline.models.backends.grounding_dino import bert_tokenizer, make_processor

    tok = bert_tokenizer(size=30522, max_length=256)
    model = _make(GroundingDinoForObjectDetection, _grounding_dino_config(), device, dtype)
    return _save(model, make_processor(tok, shortest_edge=800, longest_edge=1333), folder)


def ultralytics_model(folder: Path, device: str, dtype: torch.dtype, family: str) -> Path:  # noqa: ARG001
    """``model.yaml`` + ``weights.pt`` (the backend's converted layout), plus YOLO-World's text tower."""
    from grand_pipeline.models.backends import ultralytics_detector as ud
    from grand_pipeline.models.vision_common import fallback_queries

    source, scale = ULTRALYTICS[family]
    cfg = {k: v for k, v in ud._tasks().yaml_model_load(source).items() if k != "yaml_file"}
    names = list(fallback_queries())
    cfg.update(scale=scale, nc=len(names), names=names)
    folder.mkdir(parents=True, exist_ok=True)
    ud._save(folder, cfg, ud.build_model(cfg))  # float32 state dict, as export_checkpoint writes
    if family == "yoloworld":
        clip_model(folder / ud.TEXT_DIR, device, dtype, CLIP_B32)
    return folder


def sam_model(folder: Path, device: str, dtype: torch.dtype) -> Path:  # noqa: ARG001
    from grand_pipeline.models.backends.sam import build_sam

    folder.mkdir(parents=True, exist_ok=True)
    with torch.device(device):
        state = build_sam("vit_h").state_dict()
    path = folder / "sam_vit_h_random.pth"
    torch.save({k: v.cpu() for k, v in state.items()}, path)  # an official checkpoint is float32
    return path


#: backend -> builder of its full-profile model (backends sharing weights share a builder).
BUILDERS: dict[str, Callable[[Path, str, torch.dtype], Path]] = {
    "clip_tagger": clip_model,
    "clip_labels": clip_model,
    "clip_landmark": clip_model,
    "blip2": blip2_model,
    "blip2_region": blip2_model,
    "llava": llava_model,
    "owlv2": owlv2_model,
    "hf_depth": depth_anything_model,
    "sam": sam_model,
    "grounding_dino": grounding_dino_model,
}


def builder_for(spec: Any) -> Callable[[Path, str, torch.dtype], Path] | None:
    """The full-size builder of a ModelSpec; ultralytics members pick theirs by family."""
    if spec.backend == "ultralytics":
        family = str((spec.options or {}).get("family", "yolo"))
        if "world" in str(spec.model):
            family = "yoloworld"
        elif "rtdetr" in str(spec.model):
            family = "rtdetr"

        def build(folder: Path, device: str, dtype: torch.dtype) -> Path:
            return ultralytics_model(folder, device, dtype, family)

        build.__name__ = f"ultralytics_{family}"
        return build
    return BUILDERS.get(spec.backend)


def parameter_count(backend: str) -> int:
    """Parameters of ``backend``'s full-size model, counted on the meta device (no memory used)."""
    if backend == "sam":
        from grand_pipeline.models.backends.sam import build_sam

        with torch.device("meta"):
            return sum(p.numel() for p in build_sam("vit_h").parameters())
    import transformers

    specs: dict[str, tuple[str, str, dict[str, Any]]] = {
        "clip": ("CLIPModel", "CLIPConfig", CLIP_L14),
        "blip2": ("Blip2ForConditionalGeneration", "Blip2Config", BLIP2_OPT27),
        "llava": ("LlavaForConditionalGeneration", "LlavaConfig", LLAVA_15_7B),
        "owlv2": ("Owlv2ForObjectDetection", "Owlv2Config", OWLV2_B16),
    }
    family = {"clip_tagger": "clip", "clip_labels": "clip", "clip_landmark": "clip", "blip2_region": "blip2"}
    key = family.get(backend, backend)
    if backend == "hf_depth":
        with torch.device("meta"):
            model = transformers.AutoModelForDepthEstimation.from_config(_depth_anything_config())
        return sum(p.numel() for p in model.parameters())
    if backend == "grounding_dino":
        with torch.device("meta"):
            model = transformers.GroundingDinoForObjectDetection._from_config(_grounding_dino_config())
        return sum(p.numel() for p in model.parameters())
    if key not in specs:
        raise KeyError(f"no full-size config for backend {backend!r}; known: {', '.join(sorted(BUILDERS))}")
    model_name, config_name, kwargs = specs[key]
    config = getattr(transformers, config_name)(**kwargs)
    with torch.device("meta"):
        model = getattr(transformers, model_name)._from_config(config)
    return sum(p.numel() for p in model.parameters())
