"""Reading speech files: any format soundfile reads, any rate, any channel count.

:func:`load_audio` returns mono float32 at the requested rate or raises :class:`AudioError`
naming the file and the problem (unreadable, truncated, too short, silent, non-finite
samples), so batch jobs can log the file and go on.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

MIN_SECONDS = 0.5
SILENCE_DB = -60.0  # peak level (dBFS) below which a file counts as silent


class AudioError(ValueError):
    """A file that cannot serve as speech input; ``str()`` is ``"<path>: <problem>"``."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def _wav_declared_frames(path: Path) -> tuple[int, int] | None:
    """``(declared data bytes, bytes present)`` of a RIFF/WAVE file's data chunk, or None."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            cid, clen = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if cid == b"data":
                if clen in (0, 0xFFFFFFFF):  # streamed file: length left unknown
                    return None
                return clen, size - (pos + 8)
            pos += 8 + clen + (clen & 1)
    return None


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Samples ``[frames, channels]`` float32 and the sample rate, checked for damage."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "no such file")
    try:
        declared = _wav_declared_frames(path)
    except OSError as exc:
        raise AudioError(path, f"cannot read: {exc}") from None
    if declared is not None and declared[1] < declared[0]:
        raise AudioError(
            path,
            f"truncated: the WAV header declares {declared[0]} data bytes, "
            f"the file holds {declared[1]}",
        )
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        msg = str(exc).replace(f"'{path}'", "").replace(str(path), "").strip(" :")
        raise AudioError(path, f"unreadable or truncated audio ({msg})") from None
    return data, rate


def load_audio(
    path: str | Path,
    sample_rate: int = 16000,
    min_seconds: float = MIN_SECONDS,
    silence_db: float = SILENCE_DB,
) -> torch.Tensor:
    """Mono float32 waveform ``[samples]`` at ``sample_rate``.

    Channels are averaged; other rates are resampled (torchaudio's windowed-sinc
    ``resample``). Raises :class:`AudioError` for unreadable or truncated files, files
    with NaN/inf samples, files shorter than ``min_seconds`` and files whose peak is below
    ``silence_db`` dBFS.
    """
    data, rate = read_audio(path)
    if data.shape[0] == 0:
        raise AudioError(path, "no samples")
    if not np.isfinite(data).all():
        raise AudioError(path, "non-finite samples (NaN or inf)")
    wav = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))
    if rate != sample_rate:
        wav = AF.resample(wav, rate, sample_rate)
    seconds = wav.numel() / sample_rate
    if seconds < min_seconds:
        raise AudioError(path, f"too short: {seconds:.2f} s (minimum {min_seconds:.2f} s)")
    peak = float(wav.abs().max())
    peak_db = 20 * math.log10(peak) if peak > 0 else -math.inf
    if peak_db < silence_db:
        level = "digital silence" if peak == 0 else f"peak {peak_db:.1f} dBFS"
        raise AudioError(path, f"silent: {level} (threshold {silence_db:.0f} dBFS)")
    return wav.contiguous()
