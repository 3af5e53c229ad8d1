"""Greedy generation for GLaMM, with a real KV cache, and the GCG answer built from it.

**Cached** (default): the prompt (system line, ``<image>`` expanded to N patch embeddings, any
``<bbox>`` region features, the question, ``ASSISTANT:``) runs once and fills the Llama's
``DynamicCache``; each new token then costs one single-position step. **Uncached**
(``use_cache=False``) is the reference's method: every step re-embeds the whole prompt, CLIP
included, and re-runs the LLM over prompt + generated tokens. Both take the next token as the
argmax of the last position's logits and, whenever that token is ``[SEG]``, keep the last-layer
hidden state that predicted it (the LISA/GLaMM convention the training forward uses), so they
yield the same tokens and ``[SEG]`` states up to float rounding.

The GCG answer (``gcg``) follows the reference's post-processing: phrases are ``<p>(.*?)</p>``,
the caption is the text without tags and ``[SEG]``; the k-th ``[SEG]`` state is L-P projected and
decoded by SAM on the image's embedding into the k-th mask (logit > 0) at the original size.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from grand_pipeline.training.data.conversation import IMAGE_INTRO
from grand_pipeline.training.data.tokenize import tokenize_conversation
from grand_pipeline.training.data.tokens import P_END, P_START, SEG_TOKEN, Conversation, SpecialIds
from grand_pipeline.training.data.transforms import clip_image, sam_image

_PHRASE = re.compile(re.escape(P_START) + r"(.*?)" + re.escape(P_END), re.S)
_TAG = re.compile(r"<[^<>]*>")


@dataclass(frozen=True)
class Generated:
    token_ids: list[int]  # generated ids, the final eos included when one was produced
    seg_hidden: Tensor  # [k, D]: the last-layer state that predicted each generated [SEG]
    text: str  # decoded without the eos


def _cache_kwarg(core: Any) -> str:
    """The LlamaModel keyword for a KV cache (``cache`` in transformers 5, ``past_key_values`` before)."""
    params = inspect.signature(type(core).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def prompt_ids(tokenizer: Any, question: str, num_image_tokens: int) -> Tensor:
    """[1, L] ids of a one-round ``llava_v1`` prompt with the image intro, ending at ``ASSISTANT:``."""
    conv = Conversation(((IMAGE_INTRO + question, None),))
    tokens = tokenize_conversation(
        conv, tokenizer, SpecialIds.of(tokenizer), num_image_tokens=num_image_tokens
    )
    assert tokens is not None  # no max_length: never truncated
    return tokens.input_ids[None]


@torch.no_grad()
def greedy(
    model: Any,
    ids: Tensor,
    image: Tensor,
    boxes: Tensor | None,
    max_new_tokens: int,
    use_cache: bool = True,
    tokenizer: Any = None,
) -> Generated:
    """Greedy decoding from the prompt ``ids`` [1, L] on CLIP input ``image`` [3, C, C] with
    optional ``boxes`` [n, 4] (normalised CLIP frame, one per ``<bbox>`` of the prompt)."""
    core, head = model.model, model.lm_head
    names = ["prompt"]
    box_list = None if boxes is None else [boxes]

    def prompt() -> Tensor:
        attention = torch.ones_like(ids, dtype=torch.bool)
        return model.embed_inputs(ids, attention, None, image[None], box_list, names)[1]

    limit = model.cfg.llm.max_positions
    tokens: list[int] = []
    seg: list[Tensor] = []
    embeds = prompt()
    out = core(inputs_embeds=embeds, use_cache=use_cache)
    # ``cache`` in transformers 5 (reading the deprecated ``past_key_values`` there warns).
    cache = (out["cache"] if "cache" in out else out.get("past_key_values")) if use_cache else None
    kwarg = _cache_kwarg(core)
    length = embeds.shape[1]
    for step in range(max_new_tokens):
        state = out.last_hidden_state[0, -1]
        token = int(head(state).argmax())
        tokens.append(token)
        if token == model.ids.seg:
            seg.append(state)
        if token == model.ids.eos or step == max_new_tokens - 1 or length + len(tokens) >= limit:
            break
        if use_cache:
            step_embeds = core.embed_tokens(torch.tensor([[token]], device=model.device))
            out = core(inputs_embeds=step_embeds, use_cache=True, **{kwarg: cache})
        else:
            generated = core.embed_tokens(torch.tensor([tokens], device=model.device))
            out = core(inputs_embeds=torch.cat([prompt(), generated], 1), use_cache=False)
    hidden = torch.stack(seg) if seg else embeds.new_zeros(0, embeds.shape[-1])
    tok = tokenizer if tokenizer is not None else model.tokenizer
    body = tokens[:-1] if tokens and tokens[-1] == model.ids.eos else tokens
    text = tok.decode(body, skip_special_tokens=False) if tok is not None else ""
    return Generated(tokens, hidden, text)


def parse_gcg(text: str) -> tuple[str, list[str]]:
    """Generated text -> (caption without tags or ``[SEG]``, phrases inside ``<p>...</p>``)."""
    phrases = [p.strip() for p in _PHRASE.findall(text)]
    caption = _TAG.sub("", text).replace(SEG_TOKEN, "")
    return " ".join(caption.split()), phrases


def answer(
    model: Any,
    image: np.ndarray,
    question: str,
    *,
    boxes_px: np.ndarray | None = None,
    max_new_tokens: int = 512,
    use_cache: bool = True,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Answer ``question`` about ``image`` (H x W x 3 uint8), boxes in original pixels (xyxy) for
    the prompt's ``<bbox>`` tokens; ``[SEG]`` states become masks. Returns ``{text, token_ids,
    seg_hidden, seg_embeddings, masks [k, H, W] bool, scores (mean mask probability), iou_pred}``."""
    cfg = model.cfg
    tok = tokenizer if tokenizer is not None else model.tokenizer
    if tok is None:
        raise ValueError("generation needs the tokenizer (build_model sets model.tokenizer)")
    was_training = model.training
    model.eval()
    try:
        pixels, frame = clip_image(image, cfg.clip.image_size, cfg.clip_preprocess)
        boxes = None
        if boxes_px is not None:
            boxes = torch.from_numpy(frame.boxes(np.asarray(boxes_px)).astype(np.float32))
        ids = prompt_ids(tok, question, cfg.num_image_tokens)
        gen = greedy(model, ids, pixels, boxes, max_new_tokens, use_cache, tok)
        masks = _masks(model, image, gen.seg_hidden)
    finally:
        model.train(was_training)
    return {"text": gen.text, "token_ids": gen.token_ids, "seg_hidden": gen.seg_hidden, **masks}


@torch.no_grad()
def _masks(model: Any, image: np.ndarray, seg_hidden: Tensor) -> dict[str, Any]:
    height, width = image.shape[:2]
    prompts = model.seg_embeddings(seg_hidden)
    if seg_hidden.shape[0] == 0:
        empty = np.zeros((0, height, width), dtype=bool)
        return {"seg_embeddings": prompts, "masks": empty, "scores": [], "iou_pred": []}
    size = model.cfg.sam.img_size
    sam_input, resize = sam_image(image, size)
    logits, iou = model.decode(prompts, model.sam_embeddings(sam_input[None], [resize]), resize, (height, width))
    masks = logits > 0
    prob = logits.float().sigmoid()
    inside = (prob * masks).flatten(1).sum(1) / masks.flatten(1).sum(1).clamp(min=1)
    return {
        "seg_embeddings": prompts,
        "masks": masks.cpu().numpy(),
        "scores": [float(s) for s in inside],
        "iou_pred": [float(s) for s in iou],
    }


def gcg(
    model: Any,
    image: np.ndarray,
    instruction: str,
    *,
    max_new_tokens: int = 512,
    use_cache: bool = True,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """A grounded conversation generation answer (module docstring) with ``caption``/``phrases``."""
    out = answer(
        model, image, instruction, max_new_tokens=max_new_tokens, use_cache=use_cache, tokenizer=tokenizer
    )
    caption, phrases = parse_gcg(out["text"])
    return {"caption": caption, "phrases": phrases, **out}
