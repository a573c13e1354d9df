"""Training augmentation: SNR of added noise, reverberation alignment, speed perturbation."""

from __future__ import annotations

import random

import numpy as np
import pytest
import soundfile as sf
import torch

from attn_speech.ecapa.augment import Augmenter, add_noise, add_reverb, speed_perturb
from attn_speech.ecapa.train import crop_or_tile


def test_noise_at_the_requested_snr():
    random.seed(0)
    wav = torch.sin(torch.arange(16000) * 0.05)
    noise = torch.randn(5000)
    for snr in (0.0, 7.5, 15.0):
        mixed = add_noise(wav, noise, snr)
        added = mixed - wav
        measured = 10 * torch.log10(wav.pow(2).mean() / added.pow(2).mean())
        assert float(measured) == pytest.approx(snr, abs=1e-3)


def test_reverb_with_a_delayed_impulse_is_the_identity():
    wav = torch.randn(8000)
    rir = torch.zeros(400)
    rir[37] = 0.3  # pure delay: aligned on its peak, rescaled to the input's level
    torch.testing.assert_close(add_reverb(wav, rir), wav, atol=1e-4, rtol=0)
    echo = rir.clone()
    echo[200] = 0.2
    out = add_reverb(wav, echo)
    assert out.shape == wav.shape and torch.isclose(out.norm(), wav.norm(), rtol=1e-4)


def test_speed_perturbation_changes_the_length():
    wav = torch.randn(16000)
    assert speed_perturb(wav, 1.0, 16000) is wav
    assert abs(speed_perturb(wav, 1.1, 16000).numel() - 16000 / 1.1) <= 1
    assert abs(speed_perturb(wav, 0.9, 16000).numel() - 16000 / 0.9) <= 1


def test_augmenter_reads_folders(tmp_path):
    (tmp_path / "noise").mkdir()
    (tmp_path / "rir").mkdir()
    sf.write(tmp_path / "noise/n.wav", np.random.default_rng(0).normal(size=8000) * 0.1, 16000)
    ir = np.zeros(800)
    ir[10], ir[300] = 1.0, 0.4
    sf.write(tmp_path / "rir/r.flac", ir, 16000)
    aug = Augmenter(16000, (0.95, 1.05), tmp_path / "noise", tmp_path / "rir", 1.0, 1.0)
    assert aug.active
    random.seed(1)
    wav = crop_or_tile(torch.randn(20000) * 0.1, 16000)
    out = aug.corrupt(aug.speed(wav))
    assert torch.isfinite(out).all() and not torch.equal(out[: wav.numel()], wav)


def test_crop_or_tile():
    short = torch.arange(5.0)
    assert crop_or_tile(short, 12).tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    long = torch.arange(100.0)
    crop = crop_or_tile(long, 10)
    assert crop.numel() == 10 and torch.equal(crop, crop[0] + torch.arange(10.0))
