"""Segmentation losses of the medical references: soft Dice + cross-entropy (multi-class) or + BCE (binary)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def soft_dice_loss(logits: Tensor, target: Tensor, smooth: float = 1e-5) -> Tensor:
    """Multi-class soft Dice loss, ``1 - mean_c (2 sum p t + s) / (sum p^2 + sum t^2 + s)``.

    Softmax probabilities against one-hot targets, summed over the whole batch per class and averaged over
    every class including background (TransUNet's ``DiceLoss``, used by VM-UNet and MSVM-UNet).
    """
    num_classes = logits.shape[1]
    probs = logits.float().softmax(dim=1)
    onehot = F.one_hot(target, num_classes).movedim(-1, 1).to(probs.dtype)
    dims = (0, *range(2, probs.ndim))
    intersection = (probs * onehot).sum(dims)
    denominator = (probs * probs).sum(dims) + (onehot * onehot).sum(dims)
    return 1 - ((2 * intersection + smooth) / (denominator + smooth)).mean()


def binary_dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """Binary soft Dice loss per image, averaged: ``1 - mean_b (2 sum p t + s) / (sum p + sum t + s)`` with
    sigmoid probabilities (VM-UNet's ISIC ``DiceLoss``, smooth 1)."""
    probs = logits.float().sigmoid().flatten(1)
    target = target.float().flatten(1)
    score = (2 * (probs * target).sum(1) + smooth) / (probs.sum(1) + target.sum(1) + smooth)
    return 1 - score.mean()


class DiceCELoss(nn.Module):
    """``ce_weight * CE + dice_weight * soft Dice`` on ``(B, C, H, W)`` logits and ``(B, H, W)`` labels.

    With one output channel the output is a sigmoid foreground logit and the loss is
    ``ce_weight * BCE + dice_weight * binary Dice`` (VM-UNet's ``BceDiceLoss`` on ISIC).
    Weights: MSVM-UNet 0.4 CE + 0.6 Dice; VM-UNet 1 + 1 on Synapse and on ISIC.
    """

    def __init__(self, ce_weight: float = 0.4, dice_weight: float = 0.6) -> None:
        super().__init__()
        self.ce_weight, self.dice_weight = ce_weight, dice_weight

    def forward(self, logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        """The weighted total under ``loss`` and its parts under ``ce`` and ``dice``."""
        if logits.shape[1] == 1:
            logits = logits[:, 0]
            ce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
            dice = binary_dice_loss(logits, target)
        else:
            ce = F.cross_entropy(logits.float(), target)
            dice = soft_dice_loss(logits, target)
        return {"loss": self.ce_weight * ce + self.dice_weight * dice, "ce": ce.detach(), "dice": dice.detach()}

