"""Compressed magnitude and phase spectra, and back (MP-SENet, Lu et al. 2023,
``mag_pha_stft`` / ``mag_pha_istft``).

Shapes: waveforms ``[B, samples]``; magnitude, phase ``[B, F, T]`` with
``F = n_fft // 2 + 1``; complex ``[B, F, T, 2]`` (real, imaginary).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["StftConfig", "mag_pha_istft", "mag_pha_stft"]


@dataclass(frozen=True)
class StftConfig:
    """The paper's analysis: 16 kHz, 25 ms Hann window, 6.25 ms hop, compression 0.3."""

    n_fft: int = 400
    hop: int = 100
    win: int = 400
    compress: float = 0.3

    @property
    def bins(self) -> int:
        return self.n_fft // 2 + 1


def mag_pha_stft(
    wav: torch.Tensor, cfg: StftConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(|X|^c, angle(X), |X|^c e^{i angle(X)})`` of the centred, reflect-padded STFT.

    The small offsets keep the square root and ``atan2`` differentiable at zero.
    """
    window = torch.hann_window(cfg.win, device=wav.device, dtype=wav.dtype)
    spec = torch.stft(
        wav,
        cfg.n_fft,
        hop_length=cfg.hop,
        win_length=cfg.win,
        window=window,
        center=True,
        pad_mode="reflect",
        return_complex=True,
    )
    re, im = spec.real, spec.imag
    mag = torch.sqrt(re.square() + im.square() + 1e-9) ** cfg.compress
    pha = torch.atan2(im + 1e-10, re + 1e-5)
    com = torch.stack((mag * torch.cos(pha), mag * torch.sin(pha)), dim=-1)
    return mag, pha, com


def mag_pha_istft(
    mag: torch.Tensor, pha: torch.Tensor, cfg: StftConfig, length: int | None = None
) -> torch.Tensor:
    """Waveform ``[B, samples]`` from compressed magnitude and phase ``[B, F, T]``."""
    mag = mag ** (1.0 / cfg.compress)
    spec = torch.complex(mag * torch.cos(pha), mag * torch.sin(pha))
    window = torch.hann_window(cfg.win, device=mag.device, dtype=mag.dtype)
    return torch.istft(
        spec,
        cfg.n_fft,
        hop_length=cfg.hop,
        win_length=cfg.win,
        window=window,
        center=True,
        length=length,
    )
