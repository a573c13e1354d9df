"""Metric wrappers against direct pesq/pystoi calls and numpy formulas; ``enhance eval``."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import soundfile as sf
from pesq import pesq
from pystoi import stoi

from attn_speech.cli import main
from attn_speech.enhance import metrics

RATE = 16000


def voiced(seconds=2.0, seed=0):
    """Harmonics of a gliding 120-180 Hz pitch, amplitude-modulated at a syllable rate."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(RATE * seconds)) / RATE
    f0 = 150 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    x = sum(np.sin(k * phase) / k for k in range(1, 20))
    envelope = np.clip(np.sin(2 * np.pi * 3.5 * t + rng.uniform(0, 6)), 0, None) ** 2
    return 0.2 * envelope * x


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(1)
    clean = voiced()
    return clean, clean + 0.05 * rng.standard_normal(clean.size)


def test_wrappers_equal_direct_calls(pair):
    clean, noisy = pair
    # pystoi's BLAS calls may differ in the last bits from run to run
    same = {"rel": 1e-9, "abs": 0}
    assert metrics.pesq_wb(clean, noisy) == pytest.approx(pesq(RATE, clean, noisy, "wb"), **same)
    assert metrics.stoi(clean, noisy) == pytest.approx(stoi(clean, noisy, RATE), **same)
    want = stoi(clean, noisy, RATE, extended=True)
    assert metrics.stoi(clean, noisy, extended=True) == pytest.approx(want, **same)
    assert metrics.pesq_wb(clean, clean) > metrics.pesq_wb(clean, noisy) + 1


def test_si_sdr_and_ssnr_against_formulas(pair):
    clean, noisy = pair
    estimate = 0.5 * noisy + 0.01  # SI-SDR ignores gain and offset
    s, x = clean - clean.mean(), estimate - estimate.mean()
    target = np.dot(x, s) / np.dot(s, s) * s
    want = 10 * np.log10(np.sum(target**2) / np.sum((x - target) ** 2))
    assert metrics.si_sdr(clean, estimate) == pytest.approx(want, rel=1e-12)
    assert metrics.si_sdr(clean, noisy) == pytest.approx(metrics.si_sdr(clean, estimate))

    frame, hop = 480, 120
    w = np.hanning(frame + 2)[1:-1]  # 0.5 (1 - cos(2 pi n / (frame + 1))), n = 1..frame
    snrs = []
    for start in range(0, clean.size - frame + 1, hop):
        c = clean[start : start + frame] * w
        e = (clean - noisy)[start : start + frame] * w
        eps = np.finfo(float).eps
        snrs.append(np.clip(10 * np.log10(np.sum(c**2) / (np.sum(e**2) + eps) + eps), -10, 35))
    assert metrics.ssnr(clean, noisy) == pytest.approx(np.mean(snrs), rel=1e-12)
    assert metrics.ssnr(clean, clean) > metrics.ssnr(clean, noisy) + 10


def test_bad_pairs_raise():
    with pytest.raises(metrics.MetricError, match="lengths differ"):
        metrics.si_sdr(np.ones(10), np.ones(11))
    with pytest.raises(metrics.MetricError, match="silent"):
        metrics.ssnr(np.zeros(1000), np.ones(1000))


def test_eval_cli_scores_skips_bad_files_and_writes_csv(tmp_path, pair, capsys):
    clean, noisy = pair
    for d in ("clean", "noisy", "enh"):
        (tmp_path / d).mkdir()
    for name, shift in (("a.wav", 0), ("b.wav", 3)):
        c = np.roll(clean, shift * 1000)
        n = np.roll(noisy, shift * 1000)
        sf.write(tmp_path / "clean" / name, c, RATE, subtype="FLOAT")
        sf.write(tmp_path / "noisy" / name, n, RATE, subtype="FLOAT")
        sf.write(tmp_path / "enh" / name, 0.5 * (c + n), RATE, subtype="FLOAT")
    sf.write(tmp_path / "clean" / "short.wav", clean[:4000], RATE, subtype="FLOAT")
    sf.write(tmp_path / "enh" / "short.wav", clean, RATE, subtype="FLOAT")  # wrong length
    sf.write(tmp_path / "clean" / "lonely.wav", clean, RATE, subtype="FLOAT")  # no twins
    out = tmp_path / "scores.csv"
    rc = main(
        ["enhance", "eval", "--clean", str(tmp_path / "clean"), "--enhanced",
         str(tmp_path / "enh"), "--noisy", str(tmp_path / "noisy"), "--csv", str(out)]
    )  # fmt: skip
    cap = capsys.readouterr()
    assert rc == 1
    assert "short.wav" in cap.err and "lonely.wav" in cap.err and "no such file" in cap.err
    rows = list(csv.DictReader(out.open()))
    assert [(r["file"].rsplit("/", 1)[1], r["system"]) for r in rows] == [
        ("a.wav", "enhanced"), ("a.wav", "noisy"), ("b.wav", "enhanced"), ("b.wav", "noisy")
    ]  # fmt: skip
    c = sf.read(tmp_path / "clean" / "a.wav")[0]
    e = sf.read(tmp_path / "enh" / "a.wav")[0]
    assert float(rows[0]["si_sdr"]) == pytest.approx(metrics.si_sdr(c, e), abs=1e-4)
    assert float(rows[0]["pesq"]) == pytest.approx(pesq(RATE, c, e, "wb"), abs=1e-4)
    assert float(rows[0]["si_sdr"]) > float(rows[1]["si_sdr"])
    assert "enhanced" in cap.out and "noisy" in cap.out and "4 scored, 4 skipped" in cap.out
