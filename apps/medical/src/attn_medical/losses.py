"""The training loss: soft Dice + cross-entropy, with deep supervision (nnU-Net's recipe)."""

from __future__ import annotations

import torch
from torch import nn


class SegmentationLoss(nn.Module):
    """``DiceCELoss`` (softmax, one-hot targets) through MONAI's ``DeepSupervisionLoss``.

    ``forward(outputs, target)``: ``outputs`` is the logits ``[B, K, *S]`` or the list
    ``[main, aux_1, ...]`` of a deeply supervised network; ``target`` is ``[B, 1, *S]``
    class indices. Auxiliary outputs at lower resolution are compared with the target
    down-sampled by nearest-neighbour interpolation, weighted 1, 1/2, 1/4, ...
    """

    def __init__(self, lambda_dice: float = 1.0, lambda_ce: float = 1.0) -> None:
        super().__init__()
        from monai.losses import DeepSupervisionLoss, DiceCELoss

        dice_ce = DiceCELoss(
            to_onehot_y=True,
            softmax=True,
            lambda_dice=lambda_dice,
            lambda_ce=lambda_ce,
            smooth_nr=1e-5,
            smooth_dr=1e-5,
        )
        self.loss = DeepSupervisionLoss(dice_ce, weight_mode="exp")

    def forward(self, outputs: torch.Tensor | list[torch.Tensor], target: torch.Tensor):
        return self.loss(outputs, target.float())
