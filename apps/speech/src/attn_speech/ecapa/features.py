"""80-dim log mel filterbanks with sentence-level mean normalisation.

The same numbers as SpeechBrain's ``Fbank(n_mels=80)`` followed by
``InputNormalization(norm_type="sentence", std_norm=False)``: a centred, zero-padded STFT
(Hamming window of 25 ms, hop 10 ms, 400-point FFT), the power spectrum through SpeechBrain's
triangular mel filters, ``10 log10`` clamped at ``amin`` and floored ``top_db`` below the
item's maximum, then the item's mean over its valid frames subtracted.

For a padded batch the maximum and the mean run over each item's own frames
(``samples // hop + 1``), so an item's features equal the ones it gets alone; padding
frames are set to zero.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attn_speech.ecapa.config import FbankConfig
from attn_speech.ecapa.lengths import frame_mask, relative_from_frames, samples_to_frames


def _to_mel(hz: float) -> float:
    return 2595 * math.log10(1 + hz / 700)


def mel_filterbank(cfg: FbankConfig) -> torch.Tensor:
    """Triangular mel filters ``[n_fft // 2 + 1, n_mels]``, built as SpeechBrain builds them
    (float32, mel scale ``2595 log10(1 + f / 700)``, filters spaced evenly in mel)."""
    f_max = cfg.f_max if cfg.f_max is not None else cfg.sample_rate // 2
    if cfg.f_min >= f_max:
        raise ValueError(f"f_min ({cfg.f_min}) must be below f_max ({f_max})")
    mel = torch.linspace(_to_mel(cfg.f_min), _to_mel(f_max), cfg.n_mels + 2)
    hz = 700 * (10 ** (mel / 2595) - 1)
    band = (hz[1:] - hz[:-1])[:-1]
    centre = hz[1:-1]
    freqs = torch.linspace(0, cfg.sample_rate // 2, cfg.n_fft // 2 + 1)
    slope = (freqs[None, :] - centre[:, None]) / band[:, None]
    return torch.clamp(torch.minimum(slope + 1.0, 1.0 - slope), min=0.0).transpose(0, 1)


class Fbank(nn.Module):
    """Log mel filterbanks and sentence mean normalisation.

    Shapes:
        ``forward(wavs, wav_lens=None)``: ``wavs`` ``[B, samples]`` at ``sample_rate``;
        ``wav_lens`` ``[B]`` relative lengths (SpeechBrain's convention). Returns
        ``(feats, lengths)``: ``feats`` ``[B, T, n_mels]``, ``T = samples // hop + 1``, and
        relative frame lengths ``[B]`` for the embedding model.
    """

    def __init__(self, config: FbankConfig | None = None, mean_norm: bool = True) -> None:
        super().__init__()
        self.config = cfg = config or FbankConfig()
        self.mean_norm = mean_norm
        self.hop = cfg.hop_samples
        self.win = cfg.win_samples
        if self.win > cfg.n_fft:
            raise ValueError(f"window ({self.win} samples) longer than n_fft ({cfg.n_fft})")
        self.register_buffer("window", torch.hamming_window(self.win), persistent=False)
        self.register_buffer("filters", mel_filterbank(cfg), persistent=False)

    def frames(self, samples: torch.Tensor) -> torch.Tensor:
        return samples_to_frames(samples, self.hop)

    @torch.autocast("cuda", enabled=False)
    def forward(
        self, wavs: torch.Tensor, wav_lens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if wavs.dim() != 2:
            raise ValueError(f"wavs must be [B, samples], got {tuple(wavs.shape)}")
        wavs = wavs.float()
        b, n = wavs.shape
        if wav_lens is None:
            samples = torch.full((b,), n, dtype=torch.long)
        else:
            samples = torch.round(wav_lens.detach().double().cpu() * n).long().clamp(1, n)
        spec = torch.stft(
            wavs,
            self.config.n_fft,
            self.hop,
            self.win,
            self.window,
            center=True,
            pad_mode="constant",
            normalized=False,
            onesided=True,
            return_complex=True,
        )
        power = spec.real.square() + spec.imag.square()  # [B, F, T]
        fb = torch.matmul(power.transpose(1, 2), self.filters)  # [B, T, n_mels]
        db = 10.0 * torch.log10(torch.clamp(fb, min=self.config.amin))
        t = db.shape[1]
        frames = self.frames(samples).clamp(max=t)
        if bool((frames == t).all()):  # no padding: no masks
            torch.maximum(db, db.amax(dim=(1, 2), keepdim=True) - self.config.top_db, out=db)
            if self.mean_norm:
                db -= db.mean(dim=1, keepdim=True)
            return db, torch.ones(b, device=db.device)
        valid = frame_mask(frames, t, device=db.device)[:, :, None]  # [B, T, 1]
        peak = db.masked_fill(~valid, -math.inf).amax(dim=(1, 2), keepdim=True)
        db = torch.maximum(db, peak - self.config.top_db)
        if self.mean_norm:
            count = frames.to(db.device, db.dtype)[:, None, None]
            mean = (db * valid).sum(dim=1, keepdim=True) / count
            db = db - mean
        db = db * valid
        return db, relative_from_frames(frames, t).to(db.device)
