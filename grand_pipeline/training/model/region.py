"""GLaMM's region encoder (``MLVLROIQueryModule``) on torchvision ops: boxes -> ``<bbox>`` embeddings.

Four CLIP hidden states (patch tokens, CLS dropped) become a feature pyramid: each level is
reshaped to its g x g grid and upsampled to 8g, 4g, 2g, g (the shallowest level gets the largest
map). ``MLVLFuse`` adds coordinate channels and mixes the levels by channel shuffling; the RoI head
pools every box from every level with ``roi_align(aligned=True)`` (mmcv 1.x ``RoIAlign`` semantics),
sums per-level 3x3 convs, flattens, projects, adds a box-position MLP and lifts to the LLM width.

Submodule and parameter names equal the released checkpoints' ``model.region_encoder.*`` keys
(``mlvl_fuse.input_conv.{l}``, ``mlvl_fuse.fuse_convs.{r}.conv|gn``, ``roi_align.pconvs.{l}``,
``roi_align.pos_embedd.{0,2,3,5}``, ``roi_align.flatten_linear``, ``roi_align.updims``), so they
load with ``strict=True``.

Box frame: boxes arrive normalised to the CLIP input frame of ``clip_size`` pixels, which the
pyramid spans. ``roi_frame="clip"`` scales them by ``clip_size``; ``roi_frame="224"`` scales them
by 224 as the reference does (inherited from GPT4RoI's 224-px CLIP), which puts a whole-image box
on the top-left 224/clip_size of the map. Released checkpoints were trained that way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

#: ``roi_frame`` -> the pixel side that normalised boxes are multiplied by (None: ``clip_size``).
ROI_FRAMES: dict[str, float | None] = {"clip": None, "224": 224.0}


class ConvGNReLU(nn.Module):
    """mmcv ``ConvModule(k=3, norm=GN)``: bias-free conv, GroupNorm, ReLU; children ``conv``/``gn``."""

    def __init__(self, dim: int, gn_groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, bias=False)  # GN's affine makes a bias redundant
        self.gn = nn.GroupNorm(gn_groups, dim)
        # mmcv ConvModule's own init: Kaiming (fan_out, ReLU) for the conv.
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.gn(self.conv(x)))


def _coords(x: Tensor) -> Tensor:
    """[B, 2, h, w] x then y in [-1, 1] (CoordConv channels for ``x`` [B, C, h, w])."""
    b, _, h, w = x.shape
    # Built in float32 then cast, so low-precision inputs get the rounded float32 grid.
    ys, xs = torch.meshgrid(
        torch.linspace(-1, 1, h, device=x.device), torch.linspace(-1, 1, w, device=x.device), indexing="ij"
    )
    return torch.stack([xs, ys])[None].expand(b, -1, -1, -1).to(x.dtype)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear, align_corners=True (the reference's resampling); a no-op at the same size."""
    return x if tuple(x.shape[-2:]) == size else F.interpolate(x, size, mode="bilinear", align_corners=True)


class MLVLFuse(nn.Module):
    """Coordinate channels, a per-level 1x1 conv, then ``fuse_rounds`` channel-shuffle rounds.

    In each round level l keeps its first ``dim - 2 * (dim // 4)`` channels and takes the last
    quarter of level l+1 and the third quarter of level l-1 (clamped at the ends), resized to its
    own map; one ``ConvGNReLU`` per round is shared by all levels.
    """

    def __init__(self, dim: int, num_levels: int, fuse_rounds: int, gn_groups: int) -> None:
        super().__init__()
        self.quarter = dim // 4
        self.keep = dim - 2 * self.quarter
        self.input_conv = nn.ModuleList(nn.Conv2d(dim + 2, dim, 1) for _ in range(num_levels))
        self.fuse_convs = nn.ModuleList(ConvGNReLU(dim, gn_groups) for _ in range(fuse_rounds))

    def _shuffle(self, maps: list[Tensor], conv: nn.Module) -> list[Tensor]:
        last = len(maps) - 1
        out = []
        for lvl, x in enumerate(maps):
            size = (x.shape[-2], x.shape[-1])
            above = maps[min(lvl + 1, last)][:, self.keep + self.quarter :]
            below = maps[max(lvl - 1, 0)][:, self.keep : self.keep + self.quarter]
            out.append(conv(torch.cat([x[:, : self.keep], _resize(above, size), _resize(below, size)], 1)))
        return out

    def forward(self, maps: list[Tensor]) -> list[Tensor]:
        """``maps``: per level [B, dim, h_l, w_l] -> the same shapes, fused."""
        maps = [conv(torch.cat([x, _coords(x)], 1)) for conv, x in zip(self.input_conv, maps, strict=True)]
        for conv in self.fuse_convs:
            maps = self._shuffle(maps, conv)  # every level reads the previous round's maps
        return maps


class RoIHead(nn.Module):
    """``MlvlRoIExtractor``: multi-level RoIAlign -> pconvs -> flatten -> + position -> LLM width."""

    def __init__(
        self, in_dim: int, out_dim: int, num_levels: int, roi_size: int, sampling_ratio: int, pos_hidden: int
    ) -> None:
        super().__init__()
        self.roi_size, self.sampling_ratio = roi_size, sampling_ratio
        self.pconvs = nn.ModuleList(nn.Conv2d(in_dim, in_dim, 3, padding=1) for _ in range(num_levels))
        self.pos_embedd = nn.Sequential(
            nn.Linear(4, pos_hidden),
            nn.ReLU(inplace=True),
            nn.LayerNorm(pos_hidden),
            nn.Linear(pos_hidden, in_dim),
            nn.ReLU(inplace=True),
            nn.LayerNorm(in_dim),
        )
        self.updims = nn.Linear(in_dim, out_dim)
        self.flatten_linear = nn.Linear(in_dim * roi_size**2, in_dim)
        for name, param in self.pconvs.named_parameters():  # the reference's normal_init(std=0.01)
            if name.endswith("weight"):
                nn.init.normal_(param, std=0.01)
            else:
                nn.init.zeros_(param)

    def pool(self, maps: list[Tensor], rois: Tensor, clip_size: int) -> Tensor:
        """RoIAlign every RoI on every level.

        Args:
            maps: per level [B, C, h_l, w_l], each spanning the ``clip_size`` frame.
            rois: [K, 5] (batch index, x1, y1, x2, y2) in pixels of the ``clip_size`` frame.
        Returns:
            [L, K, C, roi_size, roi_size] in the maps' dtype.
        """
        out = []
        for x in maps:
            # Boxes in half precision would be off by whole pixels (bf16 keeps 8 bits), so the
            # op runs in at least float32, as torchvision's autocast rule and the reference do.
            work = torch.promote_types(x.dtype, torch.float32)
            pooled = roi_align(
                x.to(work),
                rois.to(work),
                output_size=self.roi_size,
                spatial_scale=x.shape[-1] / clip_size,
                sampling_ratio=self.sampling_ratio,
                aligned=True,
            )
            out.append(pooled.to(x.dtype))
        return torch.stack(out)

    def forward(self, pooled: Tensor, boxes: Tensor) -> Tensor:
        """``pooled`` [L, K, C, r, r] from :meth:`pool`, ``boxes`` [K, 4] normalised -> [K, out_dim]."""
        fused = self.pconvs[0](pooled[0])
        for conv, level in zip(self.pconvs[1:], pooled[1:], strict=True):
            fused = fused + conv(level)
        fused = F.relu(fused)
        feats = self.flatten_linear(fused.flatten(1)) + self.pos_embedd(boxes.to(fused.dtype))
        return self.updims(feats)


class RegionEncoder(nn.Module):
    """CLIP multi-level patch tokens + normalised boxes -> one ``out_dim`` embedding per box."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_levels: int = 4,
        roi_size: int = 14,
        fuse_rounds: int = 5,
        sampling_ratio: int = 2,
        roi_frame: str = "clip",
        gn_groups: int = 64,
        pos_hidden: int = 256,
    ) -> None:
        super().__init__()
        if roi_frame not in ROI_FRAMES:
            raise ValueError(f"region: unknown roi_frame {roi_frame!r}; known: {', '.join(ROI_FRAMES)}")
        if in_dim % gn_groups:
            raise ValueError(f"region: in_dim {in_dim} is not divisible by gn_groups {gn_groups}")
        self.num_levels, self.roi_frame = num_levels, roi_frame
        self.mlvl_fuse = MLVLFuse(in_dim, num_levels, fuse_rounds, gn_groups)
        self.roi_align = RoIHead(in_dim, out_dim, num_levels, roi_size, sampling_ratio, pos_hidden)

    def _check(self, level_feats: list[Tensor], boxes: list[Tensor]) -> None:
        shapes = [tuple(f.shape) for f in level_feats]
        if len(level_feats) != self.num_levels or len(set(shapes)) != 1 or len(shapes[0]) != 3:
            raise ValueError(f"region: need {self.num_levels} levels of one [B, N, C] shape, got {shapes}")
        batch, n = shapes[0][:2]
        if round(n**0.5) ** 2 != n:
            raise ValueError(f"region: {n} tokens per level do not form a square grid (drop CLS first)")
        if len(boxes) != batch or any(b.ndim != 2 or b.shape[-1] != 4 for b in boxes):
            raise ValueError(
                f"region: need {batch} box tensors [n_i, 4], got {[tuple(b.shape) for b in boxes]}"
            )

    def pyramid(self, level_feats: list[Tensor]) -> list[Tensor]:
        """Per level [B, g*g, C] tokens -> [B, C, g * 2**(L-1-l), same] maps, shallowest largest."""
        b, n, c = level_feats[0].shape
        g = round(n**0.5)
        maps = []
        for lvl, tokens in enumerate(level_feats):
            side = g * 2 ** (self.num_levels - 1 - lvl)
            grid = tokens.transpose(1, 2).reshape(b, c, g, g)  # row-major patches, as CLIP emits them
            maps.append(_resize(grid, (side, side)))
        return maps

    def forward(self, level_feats: list[Tensor], boxes: list[Tensor], clip_size: int) -> list[Tensor]:
        """Encode the boxes of each image.

        Args:
            level_feats: ``num_levels`` tensors [B, N, in_dim], N = g*g patch tokens (CLS dropped).
            boxes: B tensors [n_i, 4], xyxy normalised to the CLIP input frame (n_i may be 0).
            clip_size: side in pixels of the square CLIP input the tokens came from.
        Returns:
            B tensors [n_i, out_dim] in the features' dtype.
        """
        self._check(level_feats, boxes)
        counts = [int(b.shape[0]) for b in boxes]
        keep = [i for i, n in enumerate(counts) if n]
        if not keep:
            return self._no_boxes(level_feats, counts)
        # Only images with boxes go through the (costly) fusion; each image is independent of
        # the others (GroupNorm is per sample), so this changes no value.
        index = torch.tensor(keep, device=level_feats[0].device)
        maps = self.mlvl_fuse(self.pyramid([f.index_select(0, index) for f in level_feats]))
        kept = [boxes[i].to(maps[0].device) for i in keep]
        pooled = self.roi_align.pool(maps, self.rois(kept, clip_size), clip_size)
        out = self.roi_align(pooled, torch.cat(kept))
        return list(out.split(counts))  # images without boxes get their [0, out_dim] here

    def rois(self, boxes: list[Tensor], clip_size: int) -> Tensor:
        """Per image [n_i, 4] normalised boxes -> [sum n_i, 5] (image index, x1, y1, x2, y2) in
        pixels of the ``roi_frame`` (``clip_size`` or the reference's 224)."""
        flat = torch.cat(boxes)
        owner = torch.repeat_interleave(
            torch.arange(len(boxes), device=flat.device),
            torch.tensor([len(b) for b in boxes], device=flat.device),
        )
        frame = ROI_FRAMES[self.roi_frame] or float(clip_size)
        return torch.cat([owner[:, None].to(flat.dtype), flat * frame], 1)

    def _no_boxes(self, level_feats: list[Tensor], counts: list[int]) -> list[Tensor]:
        """Empty [0, out_dim] outputs that still reach every parameter and input.

        A zero-valued link keeps DDP's gradient all-reduce complete on a rank whose batch has no
        boxes (the reference does the same); the fusion itself is skipped.
        """
        feats = level_feats[0]
        link = feats.new_zeros(())
        for t in [*self.parameters(), *level_feats]:
            link = link + t.sum().to(feats.dtype) * 0.0
        empty = feats.new_zeros(0, self.roi_align.updims.out_features) + link
        return [empty for _ in counts]
