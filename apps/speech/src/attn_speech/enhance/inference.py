"""Enhancing recordings of any length and sample rate with a :class:`MambAttention`.

Long signals go through the network in overlapping chunks joined by overlap-add with linear
cross-fades, so memory depends on the chunk length, not on the file length.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from attn_speech.audio import AudioError, read_audio
from attn_speech.enhance.model import MambAttention
from attn_speech.outputs import write_atomic

__all__ = ["AUDIO_SUFFIXES", "chunk_starts", "enhance_file", "enhance_waveform"]

AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".ogg", ".aiff", ".aif"})


def _fade_weights(length: int, fade_in: int, fade_out: int) -> torch.Tensor:
    w = torch.ones(length)
    if fade_in:
        w[:fade_in] = torch.arange(1, fade_in + 1) / (fade_in + 1)
    if fade_out:
        w[length - fade_out :] = torch.arange(fade_out, 0, -1) / (fade_out + 1)
    return w


def chunk_starts(samples: int, chunk: int, overlap: int) -> tuple[int, list[int]]:
    """Chunk length and start offsets covering ``samples`` with chunks of at most ``chunk``
    samples, neighbours overlapping by at least ``overlap``.

    The fewest chunks that can do it are spread evenly and made as short as they can be:
    every chunk has the same length, so none is a short remainder with little context, and
    no more audio goes through the network than the overlaps need (attention costs grow
    with the square of the chunk length).
    """
    if samples <= chunk:
        return samples, [0]
    count = -(-(samples - overlap) // (chunk - overlap))
    length = min(chunk, -(-(samples + (count - 1) * overlap) // count))
    return length, [i * (samples - length) // (count - 1) for i in range(count)]


@torch.no_grad()
def enhance_waveform(
    model: MambAttention,
    wav: torch.Tensor,
    chunk_seconds: float = 4.0,
    overlap_seconds: float = 0.5,
) -> torch.Tensor:
    """Enhanced 16 kHz mono ``wav`` ``[samples]`` -> ``[samples]``.

    Signals longer than ``chunk_seconds`` go through in equal chunks of at most that length
    (:func:`chunk_starts`) overlapping by at least ``overlap_seconds``; each overlap is a
    linear cross-fade between the two chunks' outputs.
    """
    if wav.dim() != 1:
        raise ValueError(f"wav must be [samples], got {tuple(wav.shape)}")
    rate = model.sample_rate
    chunk = max(int(chunk_seconds * rate), model.stft.n_fft)
    overlap = min(int(overlap_seconds * rate), chunk // 2)
    n = wav.numel()
    device = next(model.parameters()).device
    if n <= chunk:
        padded = torch.nn.functional.pad(wav, (0, max(0, model.stft.n_fft - n)))
        return model.enhance(padded[None].to(device))[0, :n].cpu()
    length, starts = chunk_starts(n, chunk, overlap)
    out = torch.zeros(n)
    total = torch.zeros(n)
    for i, start in enumerate(starts):
        piece = model.enhance(wav[None, start : start + length].to(device))[0].cpu()
        fade_in = starts[i - 1] + length - start if i > 0 else 0
        fade_out = start + length - starts[i + 1] if i + 1 < len(starts) else 0
        w = _fade_weights(length, fade_in, fade_out)
        out[start : start + length] += w * piece
        total[start : start + length] += w
    return out / total


def enhance_file(
    model: MambAttention,
    src: str | Path,
    dst: str | Path,
    chunk_seconds: float = 4.0,
    overlap_seconds: float = 0.5,
) -> dict:
    """Read ``src`` (any rate, channels averaged), enhance, write ``dst`` at ``src``'s rate
    and format, atomically. Raises :class:`AudioError` naming ``src`` on bad input."""
    data, rate = read_audio(src)
    if data.shape[0] == 0:
        raise AudioError(src, "no samples")
    if not np.isfinite(data).all():
        raise AudioError(src, "non-finite samples (NaN or inf)")
    info = sf.info(str(src))
    wav = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))
    if rate != model.sample_rate:
        wav = AF.resample(wav, rate, model.sample_rate)
    out = enhance_waveform(model, wav, chunk_seconds, overlap_seconds)
    if rate != model.sample_rate:
        out = AF.resample(out, model.sample_rate, rate)
    out = out[: data.shape[0]]
    if out.numel() < data.shape[0]:
        out = torch.nn.functional.pad(out, (0, data.shape[0] - out.numel()))
    samples = out.numpy().astype(np.float32)
    write_atomic(
        Path(dst),
        lambda p: sf.write(str(p), samples, rate, format=info.format, subtype=info.subtype),
    )
    return {"path": str(src), "out": str(dst), "rate": rate, "seconds": len(samples) / rate}
