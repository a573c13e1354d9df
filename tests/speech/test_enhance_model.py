"""MambAttention: parameter count at the paper configuration, shapes, STFT helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attn_speech.enhance.model import MambAttention
from attn_speech.enhance.stft import StftConfig, mag_pha_istft, mag_pha_stft

TINY = {"channels": 8, "num_blocks": 1, "num_heads": 2, "d_state": 4, "expand": 2}


def test_paper_configuration_parameter_count():
    model = MambAttention()
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 2.33e6) / 2.33e6 < 0.05, n
    # one attention module per block, shared by the time and frequency passes
    attn = [m for name, m in model.named_modules() if name.endswith("attn.attn")]
    assert len(attn) == 4


@pytest.mark.slow
def test_paper_configuration_short_forward():
    torch.manual_seed(0)
    model = MambAttention().eval()
    wav = torch.randn(1, 401)
    with torch.no_grad():
        out = model.enhance(wav)
    assert out.shape == wav.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("samples", [1, 777, 3201])
def test_shapes_odd_lengths(samples):
    torch.manual_seed(samples)
    model = MambAttention(**TINY).eval()
    wav = torch.randn(2, max(samples, 201))
    mag, pha, _ = mag_pha_stft(wav, model.stft)
    with torch.no_grad():
        m, p, c = model(mag, pha)
    assert m.shape == p.shape == mag.shape and c.shape == (*mag.shape, 2)
    assert (m >= 0).all() and (p.abs() <= torch.pi).all()
    assert model.enhance(wav).shape == wav.shape


def test_odd_fft_sizes():
    model = MambAttention(n_fft=320, hop=80, win=320, **TINY).eval()
    wav = torch.randn(1, 1999)
    with torch.no_grad():
        assert model.enhance(wav).shape == wav.shape


def test_bad_shapes_named():
    model = MambAttention(**TINY)
    with pytest.raises(ValueError, match="201"):
        model(torch.zeros(1, 200, 5), torch.zeros(1, 200, 5))
    with pytest.raises(ValueError, match="samples"):
        model.enhance(torch.zeros(5))


def test_save_and_load(tmp_path):
    model = MambAttention(**TINY).eval()
    model.save_pretrained(tmp_path / "m")
    again = MambAttention.from_pretrained(tmp_path / "m").eval()
    wav = torch.randn(1, 1600)
    with torch.no_grad():
        torch.testing.assert_close(again.enhance(wav), model.enhance(wav))


def test_stft_matches_direct_dft():
    cfg = StftConfig()
    rng = np.random.default_rng(0)
    x = rng.standard_normal(2345)
    mag, pha, com = mag_pha_stft(torch.from_numpy(x)[None], cfg)
    padded = np.pad(x, cfg.n_fft // 2, mode="reflect")
    n = np.arange(cfg.win)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / cfg.win)  # periodic Hann
    for t in (0, 7, mag.shape[-1] - 1):
        frame = padded[t * cfg.hop : t * cfg.hop + cfg.n_fft] * window
        k = np.arange(cfg.bins)[:, None]
        spec = (frame * np.exp(-2j * np.pi * k * n / cfg.n_fft)).sum(1)
        np.testing.assert_allclose(
            mag[0, :, t].numpy(), (np.abs(spec) ** 2 + 1e-9) ** (cfg.compress / 2), rtol=1e-6
        )
        big = np.abs(spec) > 1e-2
        angle = np.angle(spec[big]) - pha[0, big, t].numpy()
        assert np.abs(np.angle(np.exp(1j * angle))).max() < 1e-3
    torch.testing.assert_close(com[..., 0], mag * torch.cos(pha))
    assert mag.shape == (1, cfg.bins, 1 + 2345 // cfg.hop)


def test_stft_round_trip():
    cfg = StftConfig()
    x = torch.randn(2, 4321, dtype=torch.float64)
    mag, pha, _ = mag_pha_stft(x, cfg)
    torch.testing.assert_close(mag_pha_istft(mag, pha, cfg, length=4321), x, atol=1e-4, rtol=0)


def test_inference_path_matches_autograd_path():
    """Without autograd the network runs the compiled scan kernels (where they build), the
    tiled BiMamba and the dense blocks' shared buffer; with autograd, the PyTorch ops."""
    torch.manual_seed(4)
    model = MambAttention(**TINY).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    wav = torch.randn(2, 3001, dtype=torch.float64)
    mag, pha, _ = mag_pha_stft(wav, model.stft)
    with torch.no_grad():
        fast = model(mag, pha)
    reference = model(mag, pha)  # parameters require grad: the autograd path
    for a, b in zip(fast, reference):
        torch.testing.assert_close(a, b.detach(), rtol=1e-9, atol=1e-9)
