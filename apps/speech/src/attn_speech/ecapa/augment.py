"""Training-time augmentation of waveforms: speed perturbation, reverberation with measured
impulse responses, additive noise at a random SNR (the recipe of Snyder et al. 2018 and
of ECAPA-TDNN training). Randomness comes from the global ``random``/``torch`` generators,
which the training harness seeds per sample."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch
import torchaudio.functional as AF

from attn_speech.audio import load_audio
from attn_speech.lists import AUDIO_SUFFIXES


def audio_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{folder}: no audio files")
    return files


def speed_perturb(wav: torch.Tensor, factor: float, sample_rate: int) -> torch.Tensor:
    """Play ``factor`` times faster (tempo and pitch, as SpeechBrain's SpeedPerturb)."""
    if factor == 1.0:
        return wav
    orig = round(sample_rate * factor / 100) * 100
    return AF.resample(wav, orig, sample_rate)


def add_reverb(wav: torch.Tensor, rir: torch.Tensor) -> torch.Tensor:
    """Convolve with an impulse response aligned on its direct path (the peak), keeping
    the input's length and RMS level."""
    rir = rir / (rir.norm() + 1e-8)
    peak = int(rir.abs().argmax())
    out = AF.fftconvolve(wav, rir)[peak : peak + wav.numel()]
    return out * (wav.norm() / (out.norm() + 1e-8))


def add_noise(wav: torch.Tensor, noise: torch.Tensor, snr_db: float) -> torch.Tensor:
    """Add a random segment of ``noise`` (tiled when short) at ``snr_db``."""
    n = wav.numel()
    if noise.numel() < n:
        noise = noise.repeat(n // noise.numel() + 1)
    start = random.randint(0, noise.numel() - n)
    noise = noise[start : start + n]
    p_sig = wav.pow(2).mean()
    p_noise = noise.pow(2).mean().clamp_min(1e-12)
    gain = torch.sqrt(p_sig / (p_noise * 10 ** (snr_db / 10)))
    return wav + gain * noise


class Augmenter:
    """Speed perturbation, then reverberation, then additive noise, each drawn at random.

    ``speeds``: tempo factors drawn uniformly (``(1.0,)`` disables); ``noise_dir`` /
    ``rir_dir``: folders of noise recordings / impulse responses (``None`` disables);
    ``p_noise`` / ``p_reverb``: how often each applies; ``snr_db``: SNR range.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        speeds: Sequence[float] = (1.0,),
        noise_dir: str | Path | None = None,
        rir_dir: str | Path | None = None,
        p_noise: float = 0.5,
        p_reverb: float = 0.5,
        snr_db: tuple[float, float] = (0.0, 15.0),
    ) -> None:
        self.sample_rate = sample_rate
        self.speeds = tuple(float(s) for s in speeds)
        self.noise_files = audio_files(noise_dir) if noise_dir else []
        self.rir_files = audio_files(rir_dir) if rir_dir else []
        self.p_noise, self.p_reverb, self.snr_db = p_noise, p_reverb, snr_db
        self._cache: dict[Path, torch.Tensor] = {}

    @property
    def active(self) -> bool:
        return self.speeds != (1.0,) or bool(self.noise_files) or bool(self.rir_files)

    def _load(self, path: Path, min_seconds: float) -> torch.Tensor:
        if path not in self._cache:
            self._cache[path] = load_audio(path, self.sample_rate, min_seconds=min_seconds)
        return self._cache[path]

    def speed(self, wav: torch.Tensor) -> torch.Tensor:
        return speed_perturb(wav, random.choice(self.speeds), self.sample_rate)

    def corrupt(self, wav: torch.Tensor) -> torch.Tensor:
        """Reverberation and noise (applied after cropping, on the training segment)."""
        if self.rir_files and random.random() < self.p_reverb:
            rir = self._load(random.choice(self.rir_files), min_seconds=0.0)
            wav = add_reverb(wav, rir)
        if self.noise_files and random.random() < self.p_noise:
            noise = self._load(random.choice(self.noise_files), min_seconds=0.1)
            wav = add_noise(wav, noise, random.uniform(*self.snr_db))
        return wav
