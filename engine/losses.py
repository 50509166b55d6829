"""Segmentation losses: soft Dice plus a voxel-wise cross-entropy term.

- "regions" (3 overlapping sigmoid channels TC, WT, ET): soft Dice on sigmoid probabilities +
  binary cross-entropy with logits.
- softmax schemes (e.g. "seed3": background, core, edema): soft Dice on the softmax probabilities of
  the foreground classes + cross-entropy.

Dice is a "batch Dice": intersections and sums run over the batch and all voxels of a channel at
once, so a crop without enhancing tumour does not produce a 0/0 term of its own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from brats.labels import is_softmax, to_target

SMOOTH = 1e-5


def soft_dice(probs: torch.Tensor, target: torch.Tensor, smooth: float = SMOOTH) -> torch.Tensor:
    """Mean over channels of 1 - (2 sum(p t) + s) / (sum p + sum t + s).

    probs, target: (B, K, D, H, W) with values in [0, 1]; sums run over batch and space per channel.
    A channel empty in both gives loss 0.
    """
    if probs.shape != target.shape:
        raise ValueError(f"soft_dice: probabilities {tuple(probs.shape)} vs target {tuple(target.shape)}")
    dims = (0, *range(2, probs.ndim))
    inter = (probs * target).sum(dims)
    denom = probs.sum(dims) + target.sum(dims)
    return (1.0 - (2.0 * inter + smooth) / (denom + smooth)).mean()


def segmentation_loss(
    logits: torch.Tensor, label: torch.Tensor, scheme: str, dice_weight: float = 1.0, ce_weight: float = 1.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted Dice + cross-entropy of (B, K, D, H, W) logits against a BraTS label map (B, D, H, W).

    Computed in float32 whatever the autocast dtype of the logits. Returns the loss and its parts.
    """
    logits = logits.float()
    target = to_target(label, scheme)
    if is_softmax(scheme):
        k = logits.shape[1]
        probs = logits.softmax(dim=1)
        onehot = F.one_hot(target, k).movedim(-1, 1).to(probs.dtype)  # (B, K, D, H, W)
        dice = soft_dice(probs[:, 1:], onehot[:, 1:])  # foreground classes only
        ce = F.cross_entropy(logits, target)
    else:
        target = target.to(logits.dtype)
        if target.shape != logits.shape:
            raise ValueError(f"loss: logits {tuple(logits.shape)} vs {scheme} target {tuple(target.shape)}")
        dice = soft_dice(torch.sigmoid(logits), target)
        ce = F.binary_cross_entropy_with_logits(logits, target)
    loss = dice_weight * dice + ce_weight * ce
    return loss, {"loss": float(loss.detach()), "dice": float(dice.detach()), "ce": float(ce.detach())}
