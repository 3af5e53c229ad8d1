"""``TrainItem``s -> GLaMM's batch dict (the reference's ``custom_collate_fn`` contract).

Keys (B items, L the longest ``input_ids``)::

    image_paths           list[str]                      "<shard_id>/<file_name>"
    global_enc_images     [B, 3, C, C] uint8              CLIP inputs (``transforms.normalise_clip`` on device)
    grounding_enc_images  [B, 3, S, S] uint8 | None       SAM inputs, zeros for an item without masks
                                                          (``transforms.normalise_sam`` on device)
    bboxes                list[Tensor[n_i, 4]] | None     normalised xyxy in the CLIP frame (n_i may be 0)
    input_ids             [B, L] int64                    right-padded with the pad id
    labels                [B, L] int64                    IGNORE_INDEX on padding
    attention_masks       [B, L] bool                     from the lengths (a pad id may also be a word)
    masks_list            list[Tensor[k_i, H_i, W_i]]     uint8 {0, 1}, in [SEG] order (float on device)
    label_list            list[Tensor[H_i, W_i]]          int64 filled with 255 (only its shape is used)
    resize_list           list[tuple[int, int]]           (h, w) inside the SAM input
    offset                [B + 1] int64                   conversations per image (one each here)
    questions_list        list[list[str]]
    sampled_classes_list  list[list[str]]
    inference             bool                            False
    conversation_list     list[str]
    seg_positions         list[Tensor[k_i]] int64         hidden-state index of each [SEG] (ours)
    has_grounding         [B] bool                        which rows of grounding_enc_images are real (ours)
    tasks                 list[str]                       (ours)

The reference decides optional keys from the *first* item, so its batches must hold one task.
Here every optional field is per item, so mixed-task batches are legal. Before returning, each
item's ``[SEG]`` count is checked against its masks and seg positions, and its ``<bbox>`` count
against its boxes: a mismatch would pair masks or region features with the wrong tokens, so it
raises ``ValueError`` naming the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from grand_pipeline.training.data.dataset import TrainItem
from grand_pipeline.training.data.tokens import IGNORE_INDEX, SpecialIds

#: The fill of ``label_list`` (SAM/LISA's ignore label).
IGNORE_LABEL = 255


def _check(item: TrainItem, ids: SpecialIds) -> None:
    n_seg = int((item.input_ids == ids.seg).sum())
    n_masks, n_pos = int(item.masks.shape[0]), int(item.seg_positions.numel())
    if not n_seg == n_masks == n_pos:
        raise ValueError(
            f"{item.image_path} ({item.task}): {n_seg} [SEG] token(s) but {n_masks} mask(s) and "
            f"{n_pos} seg position(s)"
        )
    n_bbox = int((item.input_ids == ids.bbox).sum())
    n_boxes = 0 if item.bboxes is None else int(item.bboxes.shape[0])
    if n_bbox != n_boxes:
        raise ValueError(f"{item.image_path} ({item.task}): {n_bbox} <bbox> token(s) but {n_boxes} box(es)")


def stack_images(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """[3, H, W] uint8 images -> [B, 3, H, W] in channels-last memory: the transforms hand out
    channels-last views, so each image is one contiguous copy here instead of a transposition."""
    return torch.stack([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)


def _pad(rows: Sequence[torch.Tensor], value: int) -> torch.Tensor:
    """Right-pad 1-D int64 tensors to [B, max length] with ``value``."""
    out = torch.full((len(rows), max(int(r.numel()) for r in rows)), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : row.numel()] = row
    return out


@dataclass(frozen=True)
class Collator:
    """``collate_fn`` for a ``DataLoader`` over :class:`~.dataset.GrandGlammDataset`."""

    ids: SpecialIds

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> Collator:
        return cls(SpecialIds.of(tokenizer))

    def __call__(self, items: Sequence[TrainItem]) -> dict[str, Any]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        for item in items:
            _check(item, self.ids)
        lengths = torch.tensor([int(item.input_ids.numel()) for item in items])
        input_ids = _pad([item.input_ids for item in items], self.ids.pad)
        grounded = [item.grounding_image is not None for item in items]
        return {
            "image_paths": [item.image_path for item in items],
            "global_enc_images": stack_images([item.global_image for item in items]),
            "grounding_enc_images": self._grounding(items) if any(grounded) else None,
            "bboxes": self._boxes(items),
            "input_ids": input_ids,
            "labels": _pad([item.labels for item in items], IGNORE_INDEX),
            "attention_masks": torch.arange(input_ids.shape[1])[None, :] < lengths[:, None],
            "masks_list": [item.masks for item in items],
            "label_list": [
                torch.full(tuple(item.masks.shape[-2:]), IGNORE_LABEL, dtype=torch.long) for item in items
            ],
            "resize_list": [item.resize for item in items],
            "offset": torch.arange(len(items) + 1, dtype=torch.long),
            "questions_list": [list(item.questions) for item in items],
            "sampled_classes_list": [list(item.classes) for item in items],
            "inference": False,
            "conversation_list": [item.conversation for item in items],
            "seg_positions": [item.seg_positions for item in items],
            "has_grounding": torch.tensor(grounded, dtype=torch.bool),
            "tasks": [item.task for item in items],
        }

    @staticmethod
    def _grounding(items: Sequence[TrainItem]) -> torch.Tensor:
        """[B, 3, S, S]: each item's SAM input, zeros where it has none."""
        template = next(item.grounding_image for item in items if item.grounding_image is not None)
        return stack_images(
            [
                item.grounding_image if item.grounding_image is not None else torch.zeros_like(template)
                for item in items
            ]
        )

    @staticmethod
    def _boxes(items: Sequence[TrainItem]) -> list[torch.Tensor] | None:
        """Per-item [n_i, 4] boxes (n_i = 0 where none), or None when no item has boxes."""
        if all(item.bboxes is None for item in items):
            return None
        empty = torch.zeros((0, 4), dtype=torch.float32)
        return [item.bboxes if item.bboxes is not None else empty for item in items]
