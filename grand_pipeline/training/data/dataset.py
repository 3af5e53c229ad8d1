"""A PyTorch ``IterableDataset`` of GLaMM training items over a committed GranD output.

**Split.** The committed shards of the training level are shuffled with ``Random(seed, epoch)``
(identical on every rank) and dealt to (rank, worker) pairs at *shard* granularity, as the
pipeline itself works: ``shards[g::G]`` with ``g = rank * workers + worker``. With fewer shards
than ``G`` some workers get none.

**Per shard.** Rows are read (``rows.iter_shard_rows``, only ``convert.ROW_COLUMNS``); each ok
row yields at most one item. Its tasks are ordered by ``task_weights`` (drawn without replacement)
by ``Random(seed, epoch, image_id)``, and the first that has samples is converted and used
(``convert.convert_tasks``; the others are never converted, so their masks are never parsed). That
is a pure function of seed, epoch and image, so every rank, worker count and rerun picks the same
task, samples and questions for an image.
Pixels then come from the source shard in one streaming pass (``images.ImageSource``), and each
image is preprocessed as it arrives (``transforms``), masks decoded at the original H x W.

**Failures are counts** (``self.counts``, logged per shard): the converter's, ``images:*``,
``tokens:*`` (truncation), ``items:*`` and ``region:*``. With ``num_workers > 0`` each worker
process counts its own and logs them; the main process's ``counts`` stay empty.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pycocotools.mask as coco_mask
import torch
from torch.utils.data import IterableDataset, get_worker_info

from grand_pipeline.config import ConfigError
from grand_pipeline.store import Store
from grand_pipeline.training.data.conversation import SpanError, TaskConversation, build_conversation
from grand_pipeline.training.data.convert import ROW_COLUMNS, ConvertOptions, convert_tasks, row_ok
from grand_pipeline.training.data.images import DEFAULT_MAX_PIXELS, ImageSource, input_uri
from grand_pipeline.training.data.rows import committed_shards, iter_shard_rows, training_level, unit_start
from grand_pipeline.training.data.samples import TASKS, ImageRef, RegionCapSample
from grand_pipeline.training.data.tokenize import image_text, tokenize_conversation
from grand_pipeline.training.data.tokens import SpecialIds
from grand_pipeline.training.data.transforms import (
    CLIP_MODES,
    ClipFrame,
    ClipMode,
    clip_image,
    sam_image,
    sam_resized_size,
)

logger = logging.getLogger(__name__)

#: The reference's mixture (caption 0.15, region 0.40, segmentation 0.45), its segmentation share
#: split between grounded conversation and referring segmentation.
DEFAULT_TASK_WEIGHTS = {"gcg": 0.30, "refseg": 0.15, "region": 0.40, "caption": 0.15}


class DataConfigError(ConfigError):
    """A data option that cannot work; the message names the field."""


@dataclass(frozen=True)
class DataConfig:
    """Everything that shapes a training item."""

    clip_size: int = 336  # CLIP input side C
    sam_size: int = 1024  # SAM input side S (ResizeLongestSide target)
    preprocess: ClipMode = "pad"  # CLIP: "pad" (whole image seen) or "center_crop" (released checkpoints)
    max_length: int = 1536  # tokens the LLM sees, image patches included
    num_image_tokens: int = 576  # patch embeddings one <image> expands to
    task_weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_TASK_WEIGHTS))
    max_refseg: int = 3  # expressions (rounds) per referring-segmentation item
    seed: int = 0
    im_start_end: bool = True  # wrap <image> as <im_start><image><im_end>
    add_bos: bool = True
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    convert: ConvertOptions = field(default_factory=ConvertOptions)

    def __post_init__(self) -> None:
        for name in ("clip_size", "sam_size", "num_image_tokens", "max_refseg", "max_image_pixels"):
            if int(getattr(self, name)) < 1:
                raise DataConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.preprocess not in CLIP_MODES:
            raise DataConfigError(f"preprocess: {self.preprocess!r}; choose from {', '.join(CLIP_MODES)}")
        if self.max_length <= self.num_image_tokens:
            raise DataConfigError(
                f"max_length: {self.max_length} leaves no room for text after "
                f"{self.num_image_tokens} image tokens"
            )
        unknown = sorted(set(self.task_weights) - set(TASKS))
        if unknown:
            raise DataConfigError(f"task_weights: unknown task(s) {unknown}; tasks: {', '.join(TASKS)}")
        if any(float(w) < 0 for w in self.task_weights.values()) or sum(self.task_weights.values()) <= 0:
            raise DataConfigError(
                f"task_weights: need weights >= 0 with a positive sum, got {dict(self.task_weights)}"
            )


@dataclass
class TrainItem:
    """One preprocessed, tokenised training example (what ``collate`` batches)."""

    image_path: str  # "<shard_id>/<file_name>", for messages
    task: str
    global_image: torch.Tensor  # [3, C, C] uint8 CLIP input (normalised on the device)
    grounding_image: torch.Tensor | None  # [3, S, S] uint8 SAM input; only when there are masks
    resize: tuple[int, int]  # (h, w) of the image inside the SAM input
    bboxes: torch.Tensor | None  # [n, 4] float32 normalised xyxy in the CLIP frame; region items
    masks: torch.Tensor  # [k, H, W] uint8 in {0, 1}, the k-th [SEG]'s mask; k may be 0
    input_ids: torch.Tensor  # [L] int64 with one IMAGE_TOKEN_INDEX
    labels: torch.Tensor  # [L] int64
    seg_positions: torch.Tensor  # [k] int64 in the expanded sequence
    conversation: str
    questions: list[str]
    classes: list[str]


def task_order(cfg: DataConfig, rng: random.Random) -> list[str]:
    """The weighted tasks in the order an image tries them: drawn by weight without replacement,
    so the first is the mixture's pick and the rest are fallbacks for an image that lacks it."""
    pool = [t for t in TASKS if cfg.task_weights.get(t, 0) > 0]
    order = []
    while pool:
        task = rng.choices(pool, weights=[cfg.task_weights[t] for t in pool])[0]
        order.append(task)
        pool.remove(task)
    return order


def choose(row: dict[str, Any], cfg: DataConfig, rng: random.Random, counts: Counter) -> tuple[str, list[Any]] | None:
    """The task and samples of one ok row's item, or ``None`` when no weighted task has samples.

    Only the tasks tried are converted: the first in :func:`task_order` that yields samples."""
    for task in task_order(cfg, rng):
        pool = convert_tasks(row, cfg.convert, counts, tasks=(task,)).by_task(task)
        if not pool:
            continue
        if task == "refseg":
            return task, rng.sample(pool, min(cfg.max_refseg, len(pool)))
        return task, [rng.choice(pool)]
    return None


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class GrandGlammDataset(IterableDataset):
    """Training items from the committed output at ``output_uri`` (module docstring).

    ``tokenizer`` is a transformers tokenizer with ``tokens.SPECIAL_TOKENS`` added; ``images_uri``
    overrides the run's recorded input; ``rank``/``world_size`` default to ``torch.distributed``'s.
    """

    def __init__(
        self,
        output_uri: str,
        tokenizer: Any,
        config: DataConfig | None = None,
        *,
        images_uri: str | None = None,
        level: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        if (rank is None) != (world_size is None) or (
            rank is not None and world_size is not None and not 0 <= rank < world_size
        ):
            raise ValueError(
                f"rank and world_size go together with 0 <= rank < world_size: {rank}, {world_size}"
            )
        self.store = Store(output_uri)
        self.cfg = config or DataConfig()
        self.tokenizer = tokenizer
        self.ids = SpecialIds.of(tokenizer)
        self.level = training_level(self.store) if level is None else level
        self.images = ImageSource(input_uri(self.store, images_uri), self.cfg.max_image_pixels)
        self.rank, self.world_size = rank, world_size
        # The epoch lives in shared memory: loader workers that persist across epochs (they are
        # forked once, not once per epoch) read the value the main process set, at every pass.
        self._epoch = torch.zeros(1, dtype=torch.long).share_memory_()
        self.counts: Counter = Counter()

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle shards and redraw tasks; call with the same value on every rank (and before
        each pass: persistent loader workers see the new value)."""
        self._epoch[0] = epoch

    def shards(self, worker: int = 0, num_workers: int = 1) -> list[str]:
        """The shards of this rank's ``worker`` out of ``num_workers``, for the current epoch."""
        rank, world = _distributed()
        rank = self.rank if self.rank is not None else rank
        world = self.world_size if self.world_size is not None else world
        order = committed_shards(self.store, self.level)
        random.Random(f"{self.cfg.seed}:{self.epoch}").shuffle(order)
        return order[rank * num_workers + worker :: world * num_workers]

    def __iter__(self) -> Iterator[TrainItem]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for shard in self.shards(worker, num_workers):
            yield from self.iter_shard(shard)

    def iter_shard(self, shard: str) -> Iterator[TrainItem]:
        """The items of one committed shard, in the source shard's image order."""
        before = Counter(self.counts)
        plans: dict[str, tuple[ImageRef, str, list[Any], random.Random]] = {}
        for row in iter_shard_rows(self.store, self.level, shard, columns=ROW_COLUMNS):
            if not row_ok(row, self.counts):
                continue
            image_id = str(row["image_id"])
            rng = random.Random(f"{self.cfg.seed}:{self.epoch}:{image_id}")
            picked = choose(row, self.cfg, rng, self.counts)
            if picked is None:
                self.counts["items:no_samples"] += 1
            elif image_id in plans:
                self.counts["items:duplicate_image"] += 1
            else:
                plans[image_id] = (picked[1][0].image, picked[0], picked[1], rng)
        start = unit_start(self.store, shard)
        for ref, pixels in self.images.iter_images((p[0] for p in plans.values()), self.counts, start):
            _, task, chosen, rng = plans[ref.image_id]
            item = self.build_item(ref, pixels, task, chosen, rng)
            if item is not None:
                self.counts["items:ok"] += 1
                self.counts[f"items:{task}"] += 1
                yield item
        logger.info("shard %s: %s", shard, dict(sorted((self.counts - before).items())))

    def build_item(
        self, ref: ImageRef, pixels: np.ndarray, task: str, chosen: list[Any], rng: random.Random
    ) -> TrainItem | None:
        """Preprocess one image's chosen samples into a :class:`TrainItem`; ``None`` is counted."""
        cfg = self.cfg
        height, width = pixels.shape[:2]
        global_image, frame = clip_image(pixels, cfg.clip_size, cfg.preprocess)
        if task == "region":
            chosen = self._regions_in_frame(chosen[0], frame)
            if not chosen:
                return None
        try:
            built = build_conversation(task, chosen, rng)
        except SpanError as e:
            logger.warning("image %s: %s", ref.image_id, e)
            self.counts[f"{task}:bad_spans"] += 1
            return None
        tokens = tokenize_conversation(
            built.conversation,
            self.tokenizer,
            self.ids,
            num_image_tokens=cfg.num_image_tokens,
            max_length=cfg.max_length,
            im_start_end=cfg.im_start_end,
            add_bos=cfg.add_bos,
            counts=self.counts,
        )
        if tokens is None:
            return None
        masks = self._masks(built, height, width)
        kept = built.conversation.rounds[: tokens.rounds]
        boxes = built.boxes[: tokens.n_bbox]
        return TrainItem(
            image_path=f"{ref.shard_id}/{ref.file_name}",
            task=task,
            global_image=global_image,
            grounding_image=sam_image(pixels, cfg.sam_size)[0] if built.masks else None,
            resize=sam_resized_size(height, width, cfg.sam_size),
            bboxes=torch.from_numpy(frame.boxes(np.array(boxes)).astype(np.float32)) if boxes else None,
            masks=masks,
            input_ids=tokens.input_ids,
            labels=tokens.labels,
            seg_positions=tokens.seg_positions,
            conversation=image_text(replace(built.conversation, rounds=kept).prompt(), cfg.im_start_end),
            questions=list(built.questions[: tokens.rounds]),
            classes=list(built.classes[: tokens.n_bbox] if built.boxes else built.classes),
        )

    def _regions_in_frame(self, sample: RegionCapSample, frame: ClipFrame) -> list[RegionCapSample]:
        """The region sample with only the boxes that keep some area in the CLIP frame."""
        boxes = frame.boxes(np.array([r.bbox for r in sample.regions]))
        inside = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        self.counts["region:box_outside_frame"] += int((~inside).sum())
        regions = tuple(r for r, ok in zip(sample.regions, inside, strict=True) if ok)
        if not regions:
            self.counts["items:no_region_in_frame"] += 1
            return []
        return [replace(sample, regions=regions)]

    @staticmethod
    def _masks(built: TaskConversation, height: int, width: int) -> torch.Tensor:
        """[k, H, W] uint8 {0, 1} masks in [SEG] order (k = 0 for tasks without masks); uint8, not
        float, for the same reason as the images: 4x less to copy, converted on the device."""
        if not built.masks:
            return torch.zeros((0, height, width), dtype=torch.uint8)
        # pycocotools' C decoder: every mask here passed ``convert.valid_mask`` (counts that add up
        # to H x W), the check its decoder lacks. It returns [H, W, k] in column-major order, so
        # the [k, H, W] view below is free; the device makes it contiguous.
        encoded = [{"size": list(m["size"]), "counts": m["counts"].encode()} for m in built.masks]
        return torch.from_numpy(coco_mask.decode(encoded).transpose(2, 0, 1))
