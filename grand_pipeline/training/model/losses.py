"""GLaMM's mask losses: per-mask sigmoid BCE and Dice, normalised over the masks of a batch.

As the reference (``GLaMM.py _compute_loss_components``, LISA's ``sigmoid_ce_loss`` and
``dice_loss``): each mask's BCE is the mean over its pixels, each mask's Dice is
``1 - (2 sum(p/s * g) + eps) / (sum(p/s) + sum(g/s) + eps)`` with ``p = sigmoid(logits)``,
``s = 1000`` and ``eps = 1e-6``; both are summed over every mask of the batch and divided by the
number of masks. The weights (CE 1.0, BCE 2.0, Dice 0.5) belong to the caller.

Two reference behaviours are fixed here: a predicted/GT mask-count mismatch raises (the reference
silently drops GT masks with ``gt[:n]``), and non-binary targets raise (the reference's summed
GranD-f masks reach BCE as 2 in overlaps).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["dice_loss", "mask_losses", "sigmoid_bce"]


def _check_binary(target: Tensor, what: str = "target") -> None:
    # One device sync per call; a target of 2 (summed masks) would otherwise train silently.
    if bool(((target != 0) & (target != 1)).any()):
        bad = target[(target != 0) & (target != 1)].unique()[:5].tolist()
        raise ValueError(f"mask loss: {what} masks must be binary {{0, 1}}; found values {bad}")


def _per_mask_bce(logits: Tensor, target: Tensor) -> Tensor:
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    return bce.flatten(1).mean(1)


def _per_mask_dice(logits: Tensor, target: Tensor, scale: float, eps: float) -> Tensor:
    # ``scale`` matters only against ``eps``: it makes eps relatively 1000x larger, which smooths
    # the loss of tiny masks exactly as the reference (and so its checkpoints) did.
    prob = logits.float().sigmoid().flatten(1) / scale
    gt = target.float().flatten(1)
    numerator = 2 * (prob * gt).sum(1)
    denominator = prob.sum(1) + gt.sum(1) / scale
    return 1 - (numerator + eps) / (denominator + eps)


def sigmoid_bce(logits: Tensor, target: Tensor) -> Tensor:
    """Per-mask sigmoid BCE.

    Args:
        logits: [k, H, W] mask logits.
        target: [k, H, W] binary {0, 1} masks (any dtype).
    Returns:
        [k] float32, each the mean over the mask's pixels.
    """
    _check_binary(target)
    return _per_mask_bce(logits, target)


def dice_loss(logits: Tensor, target: Tensor, scale: float = 1000.0, eps: float = 1e-6) -> Tensor:
    """Per-mask Dice loss with the reference's scaling: [k, H, W] logits and binary targets -> [k]."""
    _check_binary(target)
    return _per_mask_dice(logits, target, scale, eps)


def mask_losses(
    pred: Sequence[Tensor],
    gt: Sequence[Tensor],
    names: Sequence[str],
    scale: float = 1000.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor, int]:
    """BCE and Dice over a batch, each summed over masks and divided by the batch's mask count.

    Args:
        pred: per image [k_i, H_i, W_i] logits at the original resolution, in ``[SEG]`` order.
        gt: per image [k_i, H_i, W_i] binary masks, paired positionally with ``pred``.
        names: per image an identifier (e.g. the image path) for error messages.
    Returns:
        (bce, dice, n_masks): two float32 scalars and the total mask count. With no masks both
        scalars are zero and still attached to ``pred``'s graph, so backward and DDP work.
    Raises:
        ValueError: list lengths differ, an image's predicted and GT masks differ in count or
            size (named by ``names[i]``), or a GT mask is not binary.
    """
    if not len(pred) == len(gt) == len(names):
        raise ValueError(f"mask loss: {len(pred)} predictions, {len(gt)} GT entries, {len(names)} names")
    bce_sum: Tensor | None = None
    dice_sum: Tensor | None = None
    n_masks = 0
    for p, g, name in zip(pred, gt, names, strict=True):
        if p.ndim != 3 or p.shape != g.shape:
            what = "count" if p.ndim == g.ndim == 3 and p.shape[0] != g.shape[0] else "shape"
            raise ValueError(
                f"mask loss: {name}: predicted masks {tuple(p.shape)} vs GT {tuple(g.shape)} "
                f"({what} mismatch; expected [k, H, W] each)"
            )
        if p.shape[0] == 0:
            continue
        _check_binary(g, what=f"{name}: GT")
        bce, dice = _per_mask_bce(p, g).sum(), _per_mask_dice(p, g, scale, eps).sum()
        bce_sum = bce if bce_sum is None else bce_sum + bce
        dice_sum = dice if dice_sum is None else dice_sum + dice
        n_masks += int(p.shape[0])
    if bce_sum is None or dice_sum is None:
        zero = _zero_like_graph(pred)
        return zero, zero.clone(), 0
    return bce_sum / n_masks, dice_sum / n_masks, n_masks


def _zero_like_graph(pred: Sequence[Tensor]) -> Tensor:
    """A float32 zero linked to every prediction (a fresh leaf with grad when there are none)."""
    if not pred:
        return torch.zeros((), requires_grad=True)
    return sum((p.float().sum() * 0.0 for p in pred), start=torch.zeros((), device=pred[0].device))
