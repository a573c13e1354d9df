"""Additive angular margin softmax (AAM-softmax, ArcFace: Deng et al. 2019), the loss of
ECAPA-TDNN training (Desplanques et al. 2020: margin 0.2, scale 30)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class AAMSoftmaxLoss(nn.Module):
    """Cross-entropy over ``scale * cos(theta_y + margin)`` for the target class and
    ``scale * cos(theta_j)`` for the others.

    Where ``theta_y + margin`` would pass pi, the target logit continues as
    ``cos(theta_y) - margin sin(margin)`` so that it keeps decreasing with the angle (the
    choice of SpeechBrain's ``AdditiveAngularMargin`` with ``easy_margin=False``).

    Shapes: ``cosines`` ``[B, classes]`` in ``[-1, 1]``, ``labels`` ``[B]`` -> scalar.
    """

    def __init__(self, margin: float = 0.2, scale: float = 30.0) -> None:
        super().__init__()
        self.margin = margin
        self.scale = scale
        self.threshold = math.cos(math.pi - margin)
        self.fallback = math.sin(math.pi - margin) * margin

    def logits(self, cosines: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = cosines.float().clamp(-1 + 1e-7, 1 - 1e-7)
        sin = torch.sqrt(1.0 - cos * cos)
        phi = cos * math.cos(self.margin) - sin * math.sin(self.margin)
        phi = torch.where(cos > self.threshold, phi, cos - self.fallback)
        target = F.one_hot(labels.long(), cos.shape[1]).bool()
        return self.scale * torch.where(target, phi, cos)

    def forward(self, cosines: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(cosines, labels), labels.long())
