"""The metric discriminator of MP-SENet (Lu et al. 2023), after MetricGAN (Fu et al. 2019,
"MetricGAN: Generative Adversarial Networks based Black-box Metric Scores Optimization for
Speech Enhancement"), an optional part of MambAttention's training (Kühne et al. 2025).

``D(clean_mag, other_mag)`` is a small CNN that learns to predict the normalised wide-band
PESQ of ``other`` against ``clean``, ``(pesq - 1) / 3.5`` (1 for clean against itself); the
generator is pushed towards ``D(clean, enhanced) = 1``, a differentiable stand-in for PESQ.

Magnitudes are the compressed spectra ``[B, F, T]`` of :mod:`attn_speech.enhance.stft`;
waveforms ``[B, samples]``; scores ``[B]``.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils.parametrizations import spectral_norm

__all__ = [
    "MetricDiscriminator",
    "discriminator_loss",
    "metric_loss",
    "normalised_pesq",
    "pesq_targets",
]

PESQ_MIN, PESQ_RANGE = 1.0, 3.5


class LearnableSigmoid1d(nn.Module):
    """``beta * sigmoid(slope * x)`` with a learnable slope per feature (MP-SENet)."""

    def __init__(self, features: int, beta: float = 1.0) -> None:
        super().__init__()
        self.beta = beta
        self.slope = nn.Parameter(torch.ones(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.beta * torch.sigmoid(self.slope * x)


class MetricDiscriminator(nn.Module):
    """Four strided 4x4 convolutions (``dim`` to ``8 dim`` channels, spectral norm, instance
    norm, PReLU), global max pooling and two linear layers to one score in ``[0, 1]``."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = [2, dim, dim * 2, dim * 4, dim * 8]
        for c_in, c_out in itertools.pairwise(channels):
            layers += [
                spectral_norm(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False)),
                nn.InstanceNorm2d(c_out, affine=True),
                nn.PReLU(c_out),
            ]
        layers += [
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
            spectral_norm(nn.Linear(dim * 8, dim * 4)),
            nn.Dropout(0.3),
            nn.PReLU(dim * 4),
            spectral_norm(nn.Linear(dim * 4, 1)),
            LearnableSigmoid1d(1),
        ]
        self.layers = nn.Sequential(*layers)

    def forward(self, clean_mag: torch.Tensor, other_mag: torch.Tensor) -> torch.Tensor:
        """``[B, F, T]`` twice -> ``[B]``."""
        return self.layers(torch.stack((clean_mag, other_mag), dim=1)).squeeze(1)


def normalised_pesq(score: float) -> float:
    """Wide-band PESQ mapped to the discriminator's target range: ``(pesq - 1) / 3.5``."""
    return (score - PESQ_MIN) / PESQ_RANGE


def pesq_targets(
    clean: torch.Tensor, estimate: torch.Tensor, sample_rate: int = 16000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised wide-band PESQ of every item of ``[B, samples]`` and whether it could be
    computed (``[B]`` float, ``[B]`` bool, on ``clean``'s device). Items PESQ rejects (no
    speech found, silent reference, non-finite samples) get target 0 and ``False``."""
    from attn_speech.enhance.metrics import pesq_wb

    ref = clean.detach().float().cpu().numpy()
    est = estimate.detach().float().cpu().numpy()
    scores, valid = np.zeros(len(ref)), np.zeros(len(ref), dtype=bool)
    for i in range(len(ref)):
        try:
            score = pesq_wb(ref[i], est[i], sample_rate)
        except (ValueError, RuntimeError):  # MetricError, or the C code failing (silence)
            continue
        if np.isfinite(score):
            scores[i], valid[i] = normalised_pesq(score), True
    device = clean.device
    return torch.tensor(scores, dtype=torch.float32, device=device), torch.from_numpy(valid).to(
        device
    )


def discriminator_loss(
    disc: nn.Module,
    clean_mag: torch.Tensor,
    est_mag: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
) -> torch.Tensor:
    """``MSE(D(c, c), 1) + MSE(D(c, e), pesq)``, the second term over the ``valid`` items
    only; ``est_mag`` is detached, so only the discriminator learns from it.

    Both pairs go through ``disc`` in one batch (a single forward, as DDP wants).
    """
    b = clean_mag.shape[0]
    scores = disc(torch.cat((clean_mag, clean_mag)), torch.cat((clean_mag, est_mag.detach())))
    real, fake = scores[:b], scores[b:]
    loss = F.mse_loss(real, torch.ones_like(real))
    if bool(valid.any()):
        loss = loss + F.mse_loss(fake[valid], targets[valid].to(fake.dtype))
    return loss


def metric_loss(disc: nn.Module, clean_mag: torch.Tensor, est_mag: torch.Tensor) -> torch.Tensor:
    """The generator's metric loss ``MSE(D(c, e), 1)``, with the discriminator's weights
    held fixed (gradients reach ``est_mag`` only)."""
    module = getattr(disc, "module", disc)  # unwrap DDP: this pass must not sync gradients
    frozen = {name: p.detach() for name, p in module.named_parameters()}
    score = functional_call(module, frozen, (clean_mag, est_mag))
    return F.mse_loss(score, torch.ones_like(score))
