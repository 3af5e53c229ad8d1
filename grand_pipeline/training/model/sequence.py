"""The LLM's input sequence: ``input_ids`` with the image placeholder expanded, as embeddings.

Each row of ``input_ids`` holds at most one ``IMAGE_TOKEN_INDEX`` (-200). It becomes
``num_image_tokens`` positions carrying the projected CLIP patch tokens, so a row of length L
becomes L + N - 1; the attention mask is widened with ones and the labels with ``IGNORE_INDEX``
there (a row without an image is right-padded by N - 1 masked positions instead, so rows stay
aligned). Every ``<bbox>`` position then carries its box's region feature instead of the
``<bbox>`` embedding, in token order. The expanded ids are kept (``IMAGE_TOKEN_INDEX`` at patch
positions) so callers can check that a ``[SEG]`` position of the collate batch really precedes a
``[SEG]`` token of the sequence the LLM saw. ``TokenIds`` are the ids this needs (and generation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from grand_pipeline.training.data.tokens import IGNORE_INDEX, IMAGE_TOKEN_INDEX, SPECIAL_TOKENS


@dataclass(frozen=True)
class TokenIds:
    """The token ids the model itself needs."""

    seg: int
    bbox: int
    pad: int
    eos: int | None
    new_rows: tuple[int, ...]  # ids of SPECIAL_TOKENS, in that order

    @classmethod
    def of(cls, tokenizer: Any) -> TokenIds:
        vocab = tokenizer.get_vocab()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
        return cls(
            vocab["[SEG]"],
            vocab["<bbox>"],
            int(pad),
            tokenizer.eos_token_id,
            tuple(vocab[t] for t in SPECIAL_TOKENS),
        )

    @classmethod
    def appended(cls, base_vocab: int) -> TokenIds:
        """GLaMM's tokens appended to a ``base_vocab``-word vocabulary (Vicuna: 32000..32006)."""
        rows = {t: base_vocab + i for i, t in enumerate(SPECIAL_TOKENS)}
        return cls(rows["[SEG]"], rows["<bbox>"], 0, None, tuple(rows.values()))


@dataclass(frozen=True)
class Expanded:
    """The batch as the LLM sees it (T = L + N - 1)."""

    ids: Tensor  # [B, T] int64, IMAGE_TOKEN_INDEX at patch positions
    attention: Tensor  # [B, T] bool
    labels: Tensor | None  # [B, T] int64 or None (inference)
    has_image: Tensor  # [B] bool


def expand(
    input_ids: Tensor,
    attention: Tensor,
    labels: Tensor | None,
    num_image_tokens: int,
    pad_id: int,
    names: Sequence[str],
) -> Expanded:
    """Expand each row's image placeholder into ``num_image_tokens`` positions (module docstring).

    Args:
        input_ids: [B, L] int64; attention: [B, L] bool; labels: [B, L] int64 or None.
        names: per row an identifier for error messages.
    Raises:
        ValueError: a row holds more than one image placeholder.
    """
    extra = num_image_tokens - 1
    rows_ids, rows_att, rows_lab, has = [], [], [], []
    for i in range(input_ids.shape[0]):
        ids, att = input_ids[i], attention[i].bool()
        lab = labels[i] if labels is not None else None
        where = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten()
        if where.numel() > 1:
            raise ValueError(
                f"{names[i]}: {where.numel()} image placeholders; one per conversation is supported"
            )
        if where.numel() == 1:
            j = int(where[0])
            img = ids.new_full((num_image_tokens,), IMAGE_TOKEN_INDEX)
            rows_ids.append(torch.cat([ids[:j], img, ids[j + 1 :]]))
            rows_att.append(torch.cat([att[:j], att.new_ones(num_image_tokens), att[j + 1 :]]))
            if lab is not None:
                rows_lab.append(
                    torch.cat([lab[:j], lab.new_full((num_image_tokens,), IGNORE_INDEX), lab[j + 1 :]])
                )
        else:
            rows_ids.append(torch.cat([ids, ids.new_full((extra,), pad_id)]))
            rows_att.append(torch.cat([att, att.new_zeros(extra)]))
            if lab is not None:
                rows_lab.append(torch.cat([lab, lab.new_full((extra,), IGNORE_INDEX)]))
        has.append(where.numel() == 1)
    return Expanded(
        ids=torch.stack(rows_ids),
        attention=torch.stack(rows_att),
        labels=torch.stack(rows_lab) if labels is not None else None,
        has_image=torch.tensor(has, device=input_ids.device),
    )


def embed(
    embed_tokens: nn.Module,
    seq: Expanded,
    image_tokens: Tensor,
    region_feats: Sequence[Tensor],
    bbox_id: int,
    pad_id: int,
    names: Sequence[str],
) -> Tensor:
    """Input embeddings [B, T, D] of ``seq``.

    Args:
        embed_tokens: the LLM's token embedding.
        image_tokens: [B, N, D] projected CLIP patch tokens, one row per batch row.
        region_feats: per row [n_i, D], the region feature of each ``<bbox>`` in token order.
    Raises:
        ValueError: a row's ``<bbox>`` count differs from its number of region features.
    """
    ids = seq.ids
    out = embed_tokens(ids.masked_fill(ids < 0, pad_id))
    image_mask = (ids == IMAGE_TOKEN_INDEX)[..., None]
    if bool(seq.has_image.any()):
        out = out.masked_scatter(image_mask, image_tokens[seq.has_image].to(out.dtype))
    bbox_mask = ids == bbox_id
    counts = bbox_mask.sum(1).tolist()
    for i, (n_tokens, feats) in enumerate(zip(counts, region_feats, strict=True)):
        if n_tokens != feats.shape[0]:
            raise ValueError(f"{names[i]}: {n_tokens} <bbox> token(s) but {feats.shape[0]} region feature(s)")
    if sum(counts):
        out = out.masked_scatter(bbox_mask[..., None], torch.cat(list(region_feats)).to(out.dtype))
    return out


def check_seg_positions(
    seq: Expanded, positions: Sequence[Tensor], seg_id: int, names: Sequence[str]
) -> None:
    """Each position must be the state right before a ``[SEG]`` token of the expanded sequence."""
    length = seq.ids.shape[1]
    for i, pos in enumerate(positions):
        if pos.numel() == 0:
            continue
        nxt = pos.to(seq.ids.device) + 1
        if int(pos.min()) < 0 or int(nxt.max()) >= length or not bool((seq.ids[i, nxt] == seg_id).all()):
            raise ValueError(
                f"{names[i]}: seg_positions {pos.tolist()} do not precede [SEG] tokens of the "
                f"{length}-token expanded sequence (num_image_tokens of the data and the model differ?)"
            )
