"""Speech-enhancement quality metrics on 1-D float signals at 16 kHz.

* PESQ wide band (ITU-T P.862.2) through the ``pesq`` package;
* STOI (Taal et al. 2011) and extended STOI (Jensen & Taal 2016) through ``pystoi``;
* SI-SDR (Le Roux et al. 2019, "SDR - half-baked or well done?"), zero-mean signals;
* segmental SNR as in Hu & Loizou's composite measures (30 ms Hann frames, 75 % overlap,
  frame SNRs clipped to [-10, 35] dB), the SSNR that MP-SENet and MambAttention report.

:func:`score` returns all five for one ``(clean, estimate)`` pair and raises
:class:`MetricError` for inputs that cannot be scored (lengths differ, silent reference, PESQ
finding no speech).
"""

from __future__ import annotations

import numpy as np

__all__ = ["METRICS", "MetricError", "pesq_wb", "score", "si_sdr", "ssnr", "stoi"]

METRICS = ("pesq", "stoi", "estoi", "si_sdr", "ssnr")
SAMPLE_RATE = 16000


class MetricError(ValueError):
    """A pair that cannot be scored."""


def _pair(clean: np.ndarray, estimate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    clean = np.asarray(clean, dtype=np.float64).reshape(-1)
    estimate = np.asarray(estimate, dtype=np.float64).reshape(-1)
    if clean.shape != estimate.shape:
        raise MetricError(f"lengths differ: {clean.size} clean vs {estimate.size} samples")
    if not (np.isfinite(clean).all() and np.isfinite(estimate).all()):
        raise MetricError("non-finite samples")
    if not np.any(clean):
        raise MetricError("the clean reference is silent")
    return clean, estimate


def pesq_wb(clean: np.ndarray, estimate: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """Wide-band PESQ (MOS-LQO, about 1.04 to 4.64)."""
    from pesq import PesqError, pesq

    clean, estimate = _pair(clean, estimate)
    try:
        return float(pesq(sample_rate, clean, estimate, "wb"))
    except PesqError as exc:
        raise MetricError(f"PESQ: {type(exc).__name__}") from None


def stoi(
    clean: np.ndarray, estimate: np.ndarray, extended: bool = False, sample_rate: int = SAMPLE_RATE
) -> float:
    """STOI, or ESTOI with ``extended=True`` (0 to 1)."""
    from pystoi import stoi as _stoi

    clean, estimate = _pair(clean, estimate)
    return float(_stoi(clean, estimate, sample_rate, extended=extended))


def si_sdr(clean: np.ndarray, estimate: np.ndarray) -> float:
    """Scale-invariant SDR in dB: ``10 log10(|a s|^2 / |a s - x|^2)``, ``a = <x, s> / |s|^2``,
    after removing both means."""
    clean, estimate = _pair(clean, estimate)
    s = clean - clean.mean()
    x = estimate - estimate.mean()
    target = (x @ s) / (s @ s) * s
    noise = x - target
    eps = np.finfo(np.float64).tiny
    return float(10 * np.log10((target @ target + eps) / (noise @ noise + eps)))


def ssnr(
    clean: np.ndarray,
    estimate: np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    frame_seconds: float = 0.03,
    low: float = -10.0,
    high: float = 35.0,
) -> float:
    """Segmental SNR in dB: mean over Hann-windowed frames (75 % overlap) of the frame SNR
    ``10 log10(|s|^2 / |s - x|^2)`` clipped to ``[low, high]``."""
    clean, estimate = _pair(clean, estimate)
    frame = round(frame_seconds * sample_rate)
    hop = frame // 4
    if clean.size < frame:
        raise MetricError(f"shorter than one {frame_seconds * 1000:.0f} ms frame")
    starts = np.arange(0, clean.size - frame + 1, hop)
    idx = starts[:, None] + np.arange(frame)
    window = 0.5 * (1 - np.cos(2 * np.pi * np.arange(1, frame + 1) / (frame + 1)))
    s = clean[idx] * window
    e = (clean - estimate)[idx] * window
    eps = np.finfo(np.float64).eps
    snr = 10 * np.log10((s**2).sum(1) / ((e**2).sum(1) + eps) + eps)
    return float(np.clip(snr, low, high).mean())


def score(clean: np.ndarray, estimate: np.ndarray) -> dict[str, float]:
    """All of :data:`METRICS` for one pair of 16 kHz signals."""
    return {
        "pesq": pesq_wb(clean, estimate),
        "stoi": stoi(clean, estimate),
        "estoi": stoi(clean, estimate, extended=True),
        "si_sdr": si_sdr(clean, estimate),
        "ssnr": ssnr(clean, estimate),
    }
