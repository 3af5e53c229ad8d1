"""The GLaMM model: CLIP + V-L projection + region encoder + Llama (LoRA) + L-P projection + SAM.

**Names.** ``self.model`` *is* the Llama's ``LlamaModel`` (``embed_tokens``, ``layers``, ``norm``)
with GLaMM's modules attached beside them, and ``self.lm_head`` the Llama's head, so
``state_dict()`` keys follow the released checkpoints: ``model.mm_projector.{0,2}``,
``model.region_encoder.*``, ``model.grounding_encoder.{image_encoder,prompt_encoder,mask_decoder}.*``,
``model.text_hidden_fcs.0.{0,2}``, ``model.embed_tokens``, ``model.layers.*``, ``lm_head``. The
CLIP tower is ``model.vision_tower`` (absent from releases). LoRA is injected in place by peft, so
adapted layers read ``...q_proj.base_layer.weight`` + ``...q_proj.lora_{A,B}.default.weight``;
``merged_state_dict()`` folds them back (see ``state.py``).

**Training forward** (``forward(batch)``, the collate contract of ``data/collate.py``): CLIP runs
frozen; hidden state ``clip.select_layer`` (CLS dropped) goes through the V-L projection into the
N image positions; the region encoder reads hidden states ``clip.region_levels`` and its features
replace the ``<bbox>`` embeddings; the Llama runs on the embeddings; CE is Hugging Face's shifted
mean over labelled tokens. The last-layer state at each ``seg_positions`` entry (the state that
predicts ``[SEG]``) is L-P projected into a SAM prompt, decoded against that image's SAM embedding
and upsampled to the original H x W; BCE and Dice follow ``losses.mask_losses``. Returned losses are
unweighted; ``loss = ce_w * ce + bce_w * bce + dice_w * dice``.

**Trainable**: LoRA, region encoder, L-P, mask decoder, embeddings and LM head (all rows, or only
GLaMM's new rows through a gradient mask when ``embeddings: new_rows``; use weight decay 0 then, as
the reference does), V-L projection when ``vl_projection: trained``. CLIP and SAM's image and
prompt encoders are frozen.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grand_pipeline.training.data.conversation import GCG_EVAL_INSTRUCTION
from grand_pipeline.training.data.tokens import IGNORE_INDEX
from grand_pipeline.training.data.transforms import normalise_clip, normalise_sam
from grand_pipeline.training.model import sequence, state
from grand_pipeline.training.model.config import ModelConfig
from grand_pipeline.training.model.losses import mask_losses
from grand_pipeline.training.model.region import RegionEncoder
from grand_pipeline.training.model.sam_bridge import decode_masks, postprocess_masks
from grand_pipeline.training.model.sequence import TokenIds

LOSS_KEYS = ("loss", "ce", "bce", "dice", "n_masks")


class GLaMM(nn.Module):
    """See the module docstring; built by ``builder.build_model``."""

    model: Any  # the Llama's LlamaModel with GLaMM's modules attached (Any: HF modules are untyped here)
    lm_head: nn.Linear
    new_rows: Tensor | None

    def __init__(
        self,
        cfg: ModelConfig,
        clip: nn.Module,
        llm: Any,
        sam: nn.Module,
        ids: TokenIds,
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        self.cfg, self.ids, self.tokenizer = cfg, ids, tokenizer
        core: Any = llm.model  # LlamaModel: embed_tokens, layers, norm, rotary_emb
        width, clip_width = cfg.llm.hidden_size, cfg.clip.hidden_size
        core.vision_tower = clip
        core.mm_projector = nn.Sequential(nn.Linear(clip_width, width), nn.GELU(), nn.Linear(width, width))
        core.region_encoder = RegionEncoder(clip_width, width, **cfg.region.encoder_kwargs())
        core.grounding_encoder = sam
        lp = nn.Sequential(
            nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, cfg.lp_dim), nn.Dropout(0.0)
        )
        core.text_hidden_fcs = nn.ModuleList([lp])
        self.model = core
        self.lm_head = llm.lm_head
        rows = torch.tensor(ids.new_rows, dtype=torch.long)
        self.register_buffer("new_rows", rows if cfg.embeddings == "new_rows" else None, persistent=False)
        self._configure_trainable()

    # ------------------------------------------------------------------ parameters

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def _configure_trainable(self) -> None:
        core = self.model
        self.requires_grad_(False)
        trained: list[nn.Module] = [
            core.region_encoder,
            core.text_hidden_fcs,
            core.grounding_encoder.mask_decoder,
            core.embed_tokens,
            self.lm_head,
        ]
        if self.cfg.vl_projection == "trained":
            trained.append(core.mm_projector)
        for module in trained:
            module.requires_grad_(True)
        for name, param in self.named_parameters():
            if ".lora_" in name:
                param.requires_grad_(True)
        if self.new_rows is not None and self.device.type != "meta":
            for weight in (core.embed_tokens.weight, self.lm_head.weight):
                weight.register_hook(self._mask_old_rows)

    def _mask_old_rows(self, grad: Tensor) -> Tensor:
        """[V, D] gradient -> zero outside GLaMM's new token rows (``embeddings: new_rows``)."""
        keep = torch.zeros(grad.shape[0], 1, dtype=grad.dtype, device=grad.device)
        assert self.new_rows is not None  # the hook exists only with embeddings: new_rows
        keep[self.new_rows.to(grad.device)] = 1
        return grad * keep

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return state.trainable_state_dict(self, self.new_rows)

    def load_trainable_state_dict(self, sd: dict[str, Tensor], strict: bool = True) -> None:
        state.load_trainable_state_dict(self, sd, self.new_rows, strict)

    def merged_state_dict(self) -> dict[str, Tensor]:
        return state.merged_state_dict(self)

    def load_merged_state_dict(self, sd: dict[str, Tensor], strict: bool = True) -> None:
        state.load_merged_state_dict(self, sd, strict)

    # ------------------------------------------------------------------ encoders

    def encode_images(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        """[B, 3, C, C] uint8 CLIP inputs (the loader's) -> (image tokens [B, N, D_llm], region
        levels [B, N, D_clip] each); normalised here, on the device (``transforms.normalise_clip``)."""
        tower = self.model.vision_tower
        with torch.no_grad():
            pixels = normalise_clip(images.to(self.device)).to(tower.dtype)
            states = tower(pixels, output_hidden_states=True).hidden_states
        patches = states[self.cfg.clip.select_layer][:, 1:]
        tokens = self.model.mm_projector(patches.to(self.dtype))
        return tokens, [states[i][:, 1:].to(self.dtype) for i in self.cfg.region_levels]

    def region_features(self, levels: list[Tensor], boxes: list[Tensor] | None) -> list[Tensor]:
        """Per image [n_i, D_llm] features of its normalised CLIP-frame boxes (n_i may be 0)."""
        batch = levels[0].shape[0]
        boxes = boxes if boxes is not None else [levels[0].new_zeros(0, 4)] * batch
        feats = [b.to(self.device, self.dtype) for b in boxes]
        return self.model.region_encoder(levels, feats, self.cfg.clip.image_size)

    def sam_embeddings(self, images: Tensor, resize_list: list[tuple[int, int]]) -> Tensor:
        """[n, 3, S, S] uint8 SAM inputs with their resized (h, w) -> [n, C, S/16, S/16] image
        embeddings (frozen encoder); normalised here, on the device (``transforms.normalise_sam``)."""
        encoder = self.model.grounding_encoder.image_encoder
        with torch.no_grad():
            pixels = normalise_sam(images.to(self.device), resize_list).to(self.dtype)
            return torch.cat([encoder(x[None]) for x in pixels])

    def seg_embeddings(self, hidden: Tensor) -> Tensor:
        """[k, D_llm] states that predicted ``[SEG]`` -> [k, lp_dim] SAM prompts (L-P projection)."""
        return self.model.text_hidden_fcs[0](hidden)

    def decode(
        self, prompts: Tensor, image_embedding: Tensor, resize: tuple[int, int], original: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """[k, lp_dim] prompts on one [1, C, g, g] embedding -> (logits [k, H, W], iou_pred [k])."""
        sam = self.model.grounding_encoder
        low_res, iou = decode_masks(sam.mask_decoder, sam.prompt_encoder, image_embedding, prompts)
        size = self.cfg.sam.img_size
        return postprocess_masks(low_res, (resize[0], resize[1]), (original[0], original[1]), size), iou[:, 0]

    def embed_inputs(
        self,
        input_ids: Tensor,
        attention: Tensor,
        labels: Tensor | None,
        images: Tensor,
        boxes: list[Tensor] | None,
        names: list[str],
    ) -> tuple[sequence.Expanded, Tensor]:
        """Expanded ids/mask/labels and their input embeddings [B, T, D] (``sequence.py``)."""
        tokens, levels = self.encode_images(images)
        regions = self.region_features(levels, boxes)
        seq = sequence.expand(
            input_ids.to(self.device),
            attention.to(self.device),
            None if labels is None else labels.to(self.device),
            self.cfg.num_image_tokens,
            self.ids.pad,
            names,
        )
        return seq, sequence.embed(
            self.model.embed_tokens, seq, tokens, regions, self.ids.bbox, self.ids.pad, names
        )

    # ------------------------------------------------------------------ training

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The collate batch -> ``{loss, ce, bce, dice, n_masks}`` (module docstring)."""
        names = [str(n) for n in batch["image_paths"]]
        seq, embeds = self.embed_inputs(
            batch["input_ids"],
            batch["attention_masks"],
            batch["labels"],
            batch["global_enc_images"],
            batch.get("bboxes"),
            names,
        )
        hidden = self.model(
            inputs_embeds=embeds, attention_mask=seq.attention, use_cache=False
        ).last_hidden_state
        ce = self._ce(hidden, seq.labels)
        preds, gts, used = self._mask_predictions(batch, hidden, seq, names)
        bce, dice, n_masks = mask_losses(preds, gts, used)
        if not preds:  # keep L-P and the decoder in the graph (DDP) with a zero contribution
            bce = bce + self._zero_link()
        w = self.cfg.loss
        loss = w.ce * ce + w.bce * bce + w.dice * dice
        return {
            "loss": loss,
            "ce": ce.detach(),
            "bce": bce.detach(),
            "dice": dice.detach(),
            "n_masks": torch.tensor(n_masks, device=loss.device),
        }

    def _ce(self, hidden: Tensor, labels: Tensor | None) -> Tensor:
        """Shifted next-token CE, mean over labelled positions (only those reach the LM head)."""
        if labels is None:
            raise ValueError("training forward needs labels")
        target = labels[:, 1:]
        valid = target != IGNORE_INDEX
        if not bool(valid.any()):
            return hidden.float().sum() * 0.0
        logits = self.lm_head(hidden[:, :-1][valid])
        return F.cross_entropy(logits.float(), target[valid])

    def _zero_link(self) -> Tensor:
        params = [
            *self.model.text_hidden_fcs.parameters(),
            *self.model.grounding_encoder.mask_decoder.parameters(),
        ]
        return sum(
            (p.float().sum() * 0.0 for p in params if p.requires_grad),
            start=torch.zeros((), device=self.device),
        )

    def _mask_predictions(
        self, batch: dict[str, Any], hidden: Tensor, seq: sequence.Expanded, names: list[str]
    ) -> tuple[list[Tensor], list[Tensor], list[str]]:
        """Mask logits [k_i, H_i, W_i] of every item with masks, its GT masks and its name."""
        gts, positions = batch["masks_list"], batch["seg_positions"]
        for i, (gt, pos) in enumerate(zip(gts, positions, strict=True)):
            if gt.shape[0] != pos.numel():
                raise ValueError(f"{names[i]}: {pos.numel()} [SEG] position(s) but {gt.shape[0]} mask(s)")
        sequence.check_seg_positions(seq, positions, self.ids.seg, names)
        want = [i for i, gt in enumerate(gts) if gt.shape[0]]
        if not want:
            return [], [], []
        grounding = batch.get("grounding_enc_images")
        has = batch.get("has_grounding")
        missing = [names[i] for i in want if has is not None and not bool(has[i])]
        if grounding is None or missing:
            raise ValueError(f"{(missing or names)[0]}: has masks but no SAM input (grounding_enc_images)")
        embeddings = self.sam_embeddings(grounding[want], [batch["resize_list"][i] for i in want])
        preds = []
        for j, i in enumerate(want):
            prompts = self.seg_embeddings(hidden[i, positions[i].to(self.device)])
            height, width = gts[i].shape[-2:]
            logits, _ = self.decode(prompts, embeddings[j : j + 1], batch["resize_list"][i], (height, width))
            preds.append(logits)
        return preds, [gts[i].to(self.device) for i in want], [names[i] for i in want]

    # ------------------------------------------------------------------ inference

    def generate_gcg(
        self,
        image: np.ndarray,
        instruction: str = GCG_EVAL_INSTRUCTION,
        max_new_tokens: int = 512,
        use_cache: bool = True,
    ) -> dict[str, Any]:
        """Grounded caption of ``image`` (H x W x 3 uint8): ``{caption, phrases, masks [k, H, W] bool,
        scores, iou_pred, token_ids, seg_hidden [k, D], seg_embeddings [k, lp_dim]}`` (``generation.py``)."""
        from grand_pipeline.training.model.generation import gcg

        return gcg(self, image, instruction, max_new_tokens=max_new_tokens, use_cache=use_cache)
