"""The generator losses of MP-SENet (Lu et al. 2023, "MP-SENet: A Speech Enhancement Model
with Parallel Denoising of Magnitude and Phase Spectra"), used by MambAttention
(Kühne et al. 2025) with the same weights.

Spectra are ``[B, F, T]`` (compressed magnitude, wrapped phase), complex ``[B, F, T, 2]``,
waveforms ``[B, samples]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attn_speech.enhance.stft import StftConfig, mag_pha_stft

__all__ = ["LossWeights", "anti_wrapping", "enhancement_loss", "phase_losses"]


@dataclass(frozen=True)
class LossWeights:
    """The paper's weights; ``metric`` applies only with the metric discriminator."""

    magnitude: float = 0.9
    phase: float = 0.3
    complex: float = 0.1
    time: float = 0.2
    consistency: float = 0.1
    metric: float = 0.05


def anti_wrapping(x: torch.Tensor) -> torch.Tensor:
    """``|x - 2 pi round(x / 2 pi)|``: the distance of ``x`` to the nearest multiple of
    ``2 pi``."""
    return torch.abs(x - torch.round(x / (2 * math.pi)) * 2 * math.pi)


def phase_losses(
    clean: torch.Tensor, est: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Instantaneous phase, group delay (difference along frequency) and instantaneous
    angular frequency (difference along time) losses, each anti-wrapped and averaged."""
    ip = anti_wrapping(clean - est).mean()
    gd = anti_wrapping(torch.diff(clean, dim=1) - torch.diff(est, dim=1)).mean()
    iaf = anti_wrapping(torch.diff(clean, dim=2) - torch.diff(est, dim=2)).mean()
    return ip, gd, iaf


def enhancement_loss(
    clean_wav: torch.Tensor,
    est_wav: torch.Tensor,
    clean: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    est: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    stft: StftConfig,
    weights: LossWeights = LossWeights(),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the MP-SENet losses and each term by name.

    ``clean`` and ``est`` are ``(mag, pha, com)``; ``est_wav`` is the iSTFT of ``est``.
    The consistency loss compares ``est``'s complex spectrum with the STFT of ``est_wav``.
    """
    clean_mag, clean_pha, clean_com = clean
    mag, pha, com = est
    ip, gd, iaf = phase_losses(clean_pha, pha)
    _, _, rec_com = mag_pha_stft(est_wav, stft)
    terms = {
        "magnitude": F.mse_loss(mag, clean_mag),
        "phase": ip + gd + iaf,
        "complex": 2 * F.mse_loss(com, clean_com),
        "time": F.l1_loss(est_wav, clean_wav),
        "consistency": 2 * F.mse_loss(com, rec_com),
    }
    total = sum(getattr(weights, name) * value for name, value in terms.items())
    terms.update(ip=ip, gd=gd, iaf=iaf)
    return total, terms
