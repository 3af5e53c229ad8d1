"""GLaMM's self-contained model parts: region encoder, mask losses, the [SEG]-to-SAM bridge (CPU, tiny)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from grand_pipeline.models.backends.sam import build_sam
from grand_pipeline.training.model.losses import dice_loss, mask_losses, sigmoid_bce
from grand_pipeline.training.model.region import RegionEncoder
from grand_pipeline.training.model.sam_bridge import decode_masks, postprocess_masks, seg_prompts, tiny_sam

# ---------------------------------------------------------------- RoIAlign semantics


def _bilinear(feat: np.ndarray, y: float, x: float) -> np.ndarray:
    """detectron2 / mmcv aligned bilinear sample of feat [C, H, W] (zero outside (-1, size))."""
    _, h, w = feat.shape
    if y < -1 or y > h or x < -1 or x > w:
        return np.zeros(feat.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
    if y0 >= h - 1:
        y0, y = h - 1, float(h - 1)
    if x0 >= w - 1:
        x0, x = w - 1, float(w - 1)
    ly, lx = y - y0, x - x0
    return (
        (1 - ly) * (1 - lx) * feat[:, y0, x0]
        + (1 - ly) * lx * feat[:, y0, x1]
        + ly * (1 - lx) * feat[:, y1, x0]
        + ly * lx * feat[:, y1, x1]
    )


def _naive_roi_align(feat: np.ndarray, box, scale: float, out: int, ratio: int) -> np.ndarray:
    """Aligned RoIAlign: pixel centres at +0.5 (so subtract 0.5), ``ratio`` x ``ratio`` samples per bin."""
    x1, y1, x2, y2 = (c * scale - 0.5 for c in box)
    bin_h, bin_w = (y2 - y1) / out, (x2 - x1) / out
    res = np.zeros((feat.shape[0], out, out))
    for ph in range(out):
        for pw in range(out):
            samples = [
                _bilinear(
                    feat,
                    y1 + ph * bin_h + (iy + 0.5) * bin_h / ratio,
                    x1 + pw * bin_w + (ix + 0.5) * bin_w / ratio,
                )
                for iy in range(ratio)
                for ix in range(ratio)
            ]
            res[:, ph, pw] = np.mean(samples, axis=0)
    return res


def test_roi_align_aligned_matches_naive_bilinear():
    feat = torch.randn(1, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    boxes = [(0, 0, 12, 12), (2.3, 1.1, 7.9, 10.2), (-3, -2, 5, 4), (8, 9, 15, 14), (4, 4, 4.6, 5.0)]
    for out, ratio in ((3, 2), (2, 1), (4, 3)):
        rois = torch.tensor([[0, *b] for b in boxes], dtype=torch.float64)
        got = roi_align(feat, rois, out, spatial_scale=0.5, sampling_ratio=ratio, aligned=True)
        for k, box in enumerate(boxes):
            want = _naive_roi_align(feat[0].numpy(), box, 0.5, out, ratio)
            np.testing.assert_allclose(got[k].numpy(), want, atol=1e-12)


@pytest.mark.parametrize("frame", ["clip", "224"])
def test_whole_image_box_covers_the_clip_frame_or_the_legacy_224_corner(frame):
    clip_size, g = 336, 6  # 224/336: the legacy box covers the top-left two thirds
    enc = RegionEncoder(8, 8, roi_size=7, sampling_ratio=8, roi_frame=frame, gn_groups=4)
    maps = [torch.randn(1, 8, g * 2**k, g * 2**k, requires_grad=True) for k in (3, 2, 1, 0)]
    pooled = enc.roi_align.pool(maps, enc.rois([torch.tensor([[0.0, 0.0, 1.0, 1.0]])], clip_size), clip_size)
    pooled.sum().backward()
    for m in maps:
        side = m.shape[-1]
        touched = m.grad[0].abs().sum(0) > 0  # [side, side] cells that influence the features
        if frame == "clip":
            assert touched.all(), f"{side}x{side}: whole-image box misses cells"
        else:
            cut = side * 224 // clip_size
            assert touched[:cut, :cut].all()  # the corner is pooled in full ...
            assert not touched[cut + 1 :].any() and not touched[:, cut + 1 :].any()  # ... and nothing more
            # (cell ``cut`` may get a bilinear tail from the last sample inside the box)


# ---------------------------------------------------------------- RegionEncoder


def _tiny_encoder(**kw) -> RegionEncoder:
    torch.manual_seed(0)
    return RegionEncoder(32, 48, roi_size=7, gn_groups=8, **kw)


def _levels(batch: int, g: int = 4, dim: int = 32, dtype=torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(batch, g * g, dim, generator=gen, dtype=dtype).requires_grad_() for _ in range(4)]


def test_region_encoder_shapes_and_backward_with_mixed_box_counts():
    enc = _tiny_encoder()
    feats = _levels(3)
    boxes = [
        torch.tensor([[0.1, 0.2, 0.6, 0.9], [0.0, 0.0, 1.0, 1.0]]),
        torch.zeros(0, 4),
        torch.rand(3, 4).sort(1).values,
    ]
    out = enc(feats, boxes, clip_size=56)
    assert [tuple(o.shape) for o in out] == [(2, 48), (0, 48), (3, 48)]
    assert all(o.dtype == torch.float32 for o in out)
    sum(o.square().sum() for o in out).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    assert feats[0].grad[0].abs().sum() > 0 and feats[0].grad[1].abs().sum() == 0

    # An image without boxes is skipped by the fusion, which changes nothing for the others.
    alone = enc([f[2:].detach() for f in feats], boxes[2:], clip_size=56)
    torch.testing.assert_close(alone[0], out[2].detach())


def test_region_encoder_no_boxes_and_dtype_and_errors():
    enc = _tiny_encoder()
    feats = _levels(2)
    out = enc(feats, [torch.zeros(0, 4)] * 2, clip_size=56)
    assert [tuple(o.shape) for o in out] == [(0, 48), (0, 48)]
    sum(o.sum() for o in out).backward()  # linked to every parameter (DDP) though empty
    assert all(p.grad is not None for p in enc.parameters())

    out64 = enc.double()(_levels(1, dtype=torch.float64), [torch.tensor([[0.2, 0.2, 0.7, 0.5]])], 56)
    assert out64[0].dtype == torch.float64

    with pytest.raises(ValueError, match="levels"):
        enc(_levels(1)[:3], [torch.zeros(0, 4)], 56)
    with pytest.raises(ValueError, match="square"):
        enc([torch.randn(1, 17, 32, dtype=torch.float64)] * 4, [torch.zeros(0, 4)], 56)  # CLS kept
    with pytest.raises(ValueError, match="box tensors"):
        enc(_levels(2, dtype=torch.float64), [torch.zeros(1, 4)], 56)
    with pytest.raises(ValueError, match="roi_frame"):
        RegionEncoder(32, 48, gn_groups=8, roi_frame="336")


def test_full_size_region_encoder_matches_the_released_checkpoint_layout():
    with torch.device("meta"):
        enc = RegionEncoder(1024, 4096)
    shapes = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    want = {}
    for lvl in range(4):
        want |= {
            f"mlvl_fuse.input_conv.{lvl}.weight": (1024, 1026, 1, 1),
            f"mlvl_fuse.input_conv.{lvl}.bias": (1024,),
        }
        want |= {
            f"roi_align.pconvs.{lvl}.weight": (1024, 1024, 3, 3),
            f"roi_align.pconvs.{lvl}.bias": (1024,),
        }
    for r in range(5):
        want[f"mlvl_fuse.fuse_convs.{r}.conv.weight"] = (1024, 1024, 3, 3)
        want |= {f"mlvl_fuse.fuse_convs.{r}.gn.{p}": (1024,) for p in ("weight", "bias")}
    for i, (o, n) in {0: (256, 4), 3: (1024, 256)}.items():
        want |= {f"roi_align.pos_embedd.{i}.weight": (o, n), f"roi_align.pos_embedd.{i}.bias": (o,)}
    for i, n in {2: 256, 5: 1024}.items():
        want |= {f"roi_align.pos_embedd.{i}.weight": (n,), f"roi_align.pos_embedd.{i}.bias": (n,)}
    want |= {
        "roi_align.flatten_linear.weight": (1024, 1024 * 14 * 14),
        "roi_align.flatten_linear.bias": (1024,),
    }
    want |= {"roi_align.updims.weight": (4096, 1024), "roi_align.updims.bias": (4096,)}
    assert shapes == want
    assert sum(p.numel() for p in enc.parameters()) == 299_142_912  # 299.1 M
    assert sum(p.numel() for p in enc.roi_align.flatten_linear.parameters()) == 205_521_920  # 205.5 M


# ---------------------------------------------------------------- losses


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _bce(x: float, t: float) -> float:
    return -(t * math.log(_sig(x)) + (1 - t) * math.log(1 - _sig(x)))


LOGITS = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[2.0, -1.0], [0.0, 3.0]]])
TARGET = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [1.0, 1.0]]])


def _hand() -> tuple[list[float], list[float]]:
    bce, dice = [], []
    for x, t in zip(LOGITS.tolist(), TARGET.tolist(), strict=True):
        xs, ts = sum(x, []), sum(t, [])
        bce.append(sum(_bce(a, b) for a, b in zip(xs, ts, strict=True)) / 4)
        num = 2 * sum(_sig(a) / 1000 * b for a, b in zip(xs, ts, strict=True))
        den = sum(_sig(a) / 1000 for a in xs) + sum(ts) / 1000
        dice.append(1 - (num + 1e-6) / (den + 1e-6))
    return bce, dice


def test_bce_and_dice_equal_hand_computed_values():
    bce, dice = _hand()
    assert bce[0] == pytest.approx(math.log(2))
    assert dice[0] == pytest.approx(1 - 0.001001 / 0.003001)
    torch.testing.assert_close(sigmoid_bce(LOGITS, TARGET), torch.tensor(bce))
    torch.testing.assert_close(dice_loss(LOGITS, TARGET), torch.tensor(dice))


def test_mask_losses_normalise_over_all_masks_of_the_batch():
    bce, dice = _hand()
    pred = [LOGITS.clone().requires_grad_(), torch.zeros(0, 3, 5), LOGITS[1:]]
    gt = [TARGET, torch.zeros(0, 3, 5), TARGET[1:]]
    got_bce, got_dice, n = mask_losses(pred, gt, ["a", "b", "c"])
    assert n == 3
    assert got_bce.item() == pytest.approx((bce[0] + 2 * bce[1]) / 3)
    assert got_dice.item() == pytest.approx((dice[0] + 2 * dice[1]) / 3)
    (got_bce + got_dice).backward()
    assert pred[0].grad.abs().sum() > 0

    empty = [torch.zeros(0, 2, 2, requires_grad=True)]
    zb, zd, zn = mask_losses(empty, [torch.zeros(0, 2, 2)], ["x"])
    assert (zb.item(), zd.item(), zn) == (0.0, 0.0, 0) and zb.requires_grad
    (zb + zd).backward()
    zb, _, _ = mask_losses([], [], [])
    assert zb.item() == 0.0 and zb.requires_grad


def test_mask_losses_reject_bad_targets_and_mismatches():
    for bad in (TARGET * 2, TARGET * 0.5):
        with pytest.raises(ValueError, match="binary"):
            sigmoid_bce(LOGITS, bad)
        with pytest.raises(ValueError, match="binary"):
            dice_loss(LOGITS, bad)
    with pytest.raises(ValueError, match="img_7.jpg: GT masks must be binary"):
        mask_losses([LOGITS], [TARGET + TARGET], ["img_7.jpg"])
    with pytest.raises(ValueError, match=r"img_2.jpg: predicted masks \(1, 2, 2\) vs GT \(2, 2, 2\) \(count"):
        mask_losses([LOGITS, LOGITS[:1]], [TARGET, TARGET], ["img_1.jpg", "img_2.jpg"])
    with pytest.raises(ValueError, match="img_1.jpg.*shape"):
        mask_losses([LOGITS], [F.pad(TARGET, (0, 1))], ["img_1.jpg"])
    with pytest.raises(ValueError, match="2 predictions, 1 GT"):
        mask_losses([LOGITS, LOGITS], [TARGET], ["a", "b"])


# ---------------------------------------------------------------- SAM bridge


@pytest.fixture(scope="module")
def sam():
    return tiny_sam(img_size=64, seed=0)


def test_seg_prompts_and_decode_shapes(sam):
    dim = sam.prompt_encoder.embed_dim
    seg = torch.randn(3, dim, requires_grad=True)
    sparse, dense = seg_prompts(sam.prompt_encoder, seg)
    grid = sam.prompt_encoder.image_embedding_size
    assert sparse.shape == (3, 1, dim) and dense.shape == (3, dim, *grid)
    torch.testing.assert_close(sparse[:, 0], seg)
    torch.testing.assert_close(dense[2, :, 0, 0], sam.prompt_encoder.no_mask_embed.weight[0])

    embedding = sam.image_encoder(torch.randn(1, 3, 64, 64))
    assert embedding.shape == (1, dim, *grid)
    low_res, iou = decode_masks(sam.mask_decoder, sam.prompt_encoder, embedding, seg)
    assert low_res.shape == (3, 1, 4 * grid[0], 4 * grid[1]) and iou.shape == (3, 1)
    masks = postprocess_masks(low_res, (48, 64), (30, 40), sam_size=64)
    assert masks.shape == (3, 30, 40)
    masks.sum().backward()
    assert seg.grad.abs().sum() > 0

    none, none_iou = decode_masks(sam.mask_decoder, sam.prompt_encoder, embedding, seg[:0])
    assert none.shape == (0, 1, 4 * grid[0], 4 * grid[1]) and none_iou.shape == (0, 1)
    with pytest.raises(ValueError, match="one image embedding"):
        decode_masks(sam.mask_decoder, sam.prompt_encoder, embedding.expand(2, -1, -1, -1), seg)
    with pytest.raises(ValueError, match=r"\[n, 32\]"):
        seg_prompts(sam.prompt_encoder, torch.randn(2, 7))


def test_postprocess_crops_the_padding():
    # A 64-px SAM square holding a 32x48 image (16x16 low-res: rows < 8, cols < 12 are image).
    low_res = torch.full((1, 1, 16, 16), -10.0)
    low_res[..., 8:, :] = 1.0
    low_res[..., :, 12:] = 1.0  # positive only on the padding
    masks = postprocess_masks(low_res, (32, 48), (20, 30), sam_size=64)
    assert masks.shape == (1, 20, 30) and not (masks > 0).any()
    assert (F.interpolate(low_res, (20, 30), mode="bilinear") > 0).any()  # without the crop it leaks
    inside = postprocess_masks(-low_res * 10, (32, 48), (20, 30), sam_size=64)  # positive on the image
    assert (inside > 0).all()
    with pytest.raises(ValueError, match="does not fit"):
        postprocess_masks(low_res, (65, 10), (20, 30), sam_size=64)


def test_build_sam_img_size_is_opt_in():
    assert build_sam("tiny").image_encoder.img_size == 1024  # the pipeline backend's default
    assert tiny_sam(img_size=128).prompt_encoder.image_embedding_size == (8, 8)
    with pytest.raises(ValueError, match="multiple"):
        build_sam("tiny", img_size=100)
