"""MP-SENet losses against the formulas evaluated element by element in float64 NumPy."""

from __future__ import annotations

import numpy as np
import torch

from attn_speech.enhance.losses import LossWeights, anti_wrapping, enhancement_loss, phase_losses
from attn_speech.enhance.stft import StftConfig, mag_pha_istft, mag_pha_stft


def wrap_distance(x: np.ndarray) -> np.ndarray:
    """Distance to the nearest multiple of 2 pi, via the principal angle."""
    return np.abs(np.angle(np.exp(1j * x)))


def test_anti_wrapping_is_distance_to_nearest_multiple_of_2pi():
    x = torch.linspace(-20, 20, 1001, dtype=torch.float64)
    np.testing.assert_allclose(anti_wrapping(x).numpy(), wrap_distance(x.numpy()), atol=1e-12)
    assert anti_wrapping(torch.tensor(2 * np.pi * 3)).item() < 1e-9


def test_phase_losses_direct():
    rng = np.random.default_rng(1)
    a = rng.uniform(-np.pi, np.pi, (2, 9, 13))
    b = rng.uniform(-np.pi, np.pi, (2, 9, 13))
    ip, gd, iaf = phase_losses(torch.from_numpy(a), torch.from_numpy(b))
    want_gd = np.mean(
        [wrap_distance((a[:, f + 1] - a[:, f]) - (b[:, f + 1] - b[:, f])) for f in range(8)]
    )
    want_iaf = np.mean(
        [
            wrap_distance((a[..., t + 1] - a[..., t]) - (b[..., t + 1] - b[..., t]))
            for t in range(12)
        ]
    )
    np.testing.assert_allclose(ip.item(), wrap_distance(a - b).mean(), rtol=1e-12)
    np.testing.assert_allclose(gd.item(), want_gd, rtol=1e-12)
    np.testing.assert_allclose(iaf.item(), want_iaf, rtol=1e-12)
    # a constant phase offset is invisible to group delay and angular frequency
    _, gd0, iaf0 = phase_losses(torch.from_numpy(a), torch.from_numpy(a + 1.3))
    assert gd0.item() < 1e-12 and iaf0.item() < 1e-12


def test_total_loss_direct():
    cfg = StftConfig()
    gen = torch.Generator().manual_seed(2)
    clean_wav = torch.randn(2, 1600, generator=gen, dtype=torch.float64)
    clean = mag_pha_stft(clean_wav, cfg)
    mag = clean[0] * torch.rand(clean[0].shape, generator=gen, dtype=torch.float64) * 2
    pha = clean[1] + torch.randn(clean[1].shape, generator=gen, dtype=torch.float64)
    com = torch.stack((mag * torch.cos(pha), mag * torch.sin(pha)), -1)
    est_wav = mag_pha_istft(mag, pha, cfg, length=1600)
    w = LossWeights()
    total, terms = enhancement_loss(clean_wav, est_wav, clean, (mag, pha, com), cfg, w)

    c_mag, c_pha, c_com = (t.numpy() for t in clean)
    m, p, c = mag.numpy(), pha.numpy(), com.numpy()
    phase = (
        wrap_distance(c_pha - p).mean()
        + wrap_distance(np.diff(c_pha, axis=1) - np.diff(p, axis=1)).mean()
        + wrap_distance(np.diff(c_pha, axis=2) - np.diff(p, axis=2)).mean()
    )
    rec = mag_pha_stft(est_wav, cfg)[2].numpy()
    want = {
        "magnitude": ((m - c_mag) ** 2).mean(),
        "complex": 2 * ((c - c_com) ** 2).mean(),
        "time": np.abs(est_wav.numpy() - clean_wav.numpy()).mean(),
        "consistency": 2 * ((c - rec) ** 2).mean(),
    }
    for name, value in want.items():
        np.testing.assert_allclose(terms[name].item(), value, rtol=1e-10)
    np.testing.assert_allclose(terms["phase"].item(), phase, rtol=1e-10)
    expected = (
        0.9 * want["magnitude"]
        + 0.3 * phase
        + 0.1 * want["complex"]
        + 0.2 * want["time"]
        + 0.1 * want["consistency"]
    )
    np.testing.assert_allclose(total.item(), expected, rtol=1e-10)


def test_perfect_estimate_has_zero_spectral_losses():
    cfg = StftConfig()
    wav = torch.randn(1, 3200, dtype=torch.float64)
    spec = mag_pha_stft(wav, cfg)
    _, terms = enhancement_loss(wav, wav, spec, spec, cfg)
    for name in ("magnitude", "phase", "complex", "time"):
        assert terms[name].item() < 1e-12, name
