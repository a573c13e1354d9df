"""``attn-speech make-data noisy``: layout, SNRs, splits and noise generators."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import soundfile as sf

from attn_speech.cli import main
from attn_speech.enhance.noisy_corpus import colored_noise, hum, mix_at_snr

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")


def test_layout_snrs_and_unseen_noises(tmp_path, capsys):
    noise_dir = tmp_path / "noises"
    noise_dir.mkdir()
    rng = np.random.default_rng(0)
    sf.write(noise_dir / "fan.wav", 0.1 * rng.standard_normal(8000), 16000)
    out = tmp_path / "noisy"
    argv = ["make-data", "noisy", "--out", str(out), "--train", "5", "--test", "2",
            "--speakers", "6", "--snr-min", "0", "--snr-max", "10", "--noise-dir",
            str(noise_dir), "--train-noises", "white,babble,folder"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "corpus.json").read_text())
    assert summary["pairs"] == {"train": 5, "test": 2, "test_unseen": 2}
    spk = summary["speakers"]
    assert not set(spk["train"]) & (set(spk["test"]) | set(spk["test_unseen"]))
    assert not set(summary["babble_talkers"]) & set().union(*spk.values())
    for split, allowed in (("train", {"white", "babble", "folder"}),
                           ("test", {"white", "babble", "folder"}),
                           ("test_unseen", {"brown", "hum"})):  # fmt: skip
        rows = list(csv.DictReader((out / f"{split}.csv").open()))
        assert {r["noise"] for r in rows} <= allowed
        for r in rows:
            assert r["clean"].startswith(f"{split}/clean/")
            clean, rate = sf.read(out / r["clean"])
            noisy, _ = sf.read(out / r["noisy"])
            assert rate == 16000 and clean.shape == noisy.shape and clean.size > 8000
            assert np.abs(noisy).max() < 1
            snr = 10 * np.log10(np.sum(clean**2) / np.sum((noisy - clean) ** 2))
            assert snr == pytest.approx(float(r["snr_db"]), abs=0.05)
            assert 0 <= float(r["snr_db"]) <= 10
    assert main(argv) == 2 and "exists" in capsys.readouterr().err  # no silent overwrite


def test_noise_generators_and_mixing():
    rng = np.random.default_rng(3)
    n = 1 << 15
    f = np.fft.rfftfreq(n, 1 / 16000)
    for exponent in (0, 1, 2):
        x = colored_noise(n, exponent, rng)
        power = np.abs(np.fft.rfft(x)) ** 2
        low = power[(f > 100) & (f < 200)].mean()
        high = power[(f > 3200) & (f < 6400)].mean()
        # an octave-spaced band ratio of 2**(5 exponent): 1, 32, 1024
        assert np.log2(low / high) / 5 == pytest.approx(exponent, abs=0.25)
        assert np.sqrt(np.mean(x**2)) == pytest.approx(1.0)
    h = hum(n, rng)
    power = np.abs(np.fft.rfft(h * np.hanning(n))) ** 2
    assert power[f > 1100].sum() < 1e-6 * power.sum()
    clean = np.sin(np.arange(n) / 5)
    c, noisy = mix_at_snr(clean, 10 * h, 7.0)
    assert 10 * np.log10(np.sum(c**2) / np.sum((noisy - c) ** 2)) == pytest.approx(7.0)
    assert np.abs(noisy).max() <= 0.99 + 1e-12
