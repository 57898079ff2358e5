"""Segmentation losses for a binary target with one sigmoid output channel.

All three pool the batch into one overlap (``batch=True`` in MONAI's terms), as the
reference study did: a batch of 2D slices, many of them without tumour, then still gives
a meaningful Dice instead of an average of undefined per-slice ratios.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.losses import DiceCELoss, DiceLoss

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOSSES = ("dice", "dice_ce", "log_dice")


def log_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log(soft Dice) with +1 smoothing: log(|P| + |T| + 1) - log(2|P∩T| + 1), P = sigmoid(logits).

    Sums run over the whole batch. Computed in float32 even under autocast, because the
    sums over millions of voxels overflow float16.
    """
    p = torch.sigmoid(logits.float())
    t = target.float()
    intersection = (p * t).sum()
    return torch.log(p.sum() + t.sum() + 1.0) - torch.log(2.0 * intersection + 1.0)


def make_loss(name: str) -> LossFn:
    if name == "dice":
        dice = DiceLoss(sigmoid=True, batch=True)
        return lambda logits, target: dice(logits.float(), target)
    if name == "dice_ce":
        dice_ce = DiceCELoss(sigmoid=True, batch=True)
        return lambda logits, target: dice_ce(logits.float(), target)
    if name == "log_dice":
        return log_dice_loss
    raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(LOSSES)}")
