"""Audio input from anywhere: rates, channels, formats; bad files get a per-file error and
the batch goes on."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF
from scipy.signal import correlate

from attn_speech.audio import AudioError, load_audio
from attn_speech.cli import main


def speech_like(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))
    return (tone + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def test_any_rate_and_channel_count(tmp_path):
    mono = speech_like(1.3, 44100)
    stereo = np.stack([mono, 0.5 * mono], axis=1)
    path = tmp_path / "stereo44k.wav"
    sf.write(path, stereo, 44100, subtype="FLOAT")
    wav = load_audio(path, 16000)
    expected = AF.resample(torch.from_numpy(0.75 * mono), 44100, 16000)
    assert wav.dtype == torch.float32 and wav.dim() == 1
    torch.testing.assert_close(wav, expected, atol=1e-5, rtol=0)


def aligned_error(wav: np.ndarray, ref: np.ndarray) -> float:
    """Relative RMS error after removing the codec's delay (found by cross-correlation)."""
    lag = int(np.argmax(correlate(wav, ref, mode="full", method="fft"))) - (ref.size - 1)
    a, b = (wav[lag:], ref) if lag >= 0 else (wav, ref[-lag:])
    n = min(a.size, b.size)
    return float(np.sqrt(np.mean((a[:n] - b[:n]) ** 2) / np.mean(b[:n] ** 2)))


@pytest.mark.parametrize(
    ("fmt", "suffix", "tol"), [("FLAC", "flac", 1e-3), ("OGG", "ogg", 0.15), ("MP3", "mp3", 0.15)]
)
def test_compressed_formats(tmp_path, fmt, suffix, tol):
    ref = speech_like(1.0, 16000)
    path = tmp_path / f"a.{suffix}"
    sf.write(path, ref, 16000, format=fmt)
    wav = load_audio(path).numpy()
    assert abs(wav.size - ref.size) < 2000  # codecs may add priming samples
    assert aligned_error(wav, ref) < tol


def bad_files(tmp_path):
    good = speech_like(1.0, 16000)
    files = {}
    files["short"] = tmp_path / "short.wav"
    sf.write(files["short"], good[:4000], 16000)
    files["silent"] = tmp_path / "silent.wav"
    sf.write(files["silent"], np.zeros(16000, np.float32), 16000)
    full = tmp_path / "full.wav"
    sf.write(full, good, 16000, subtype="PCM_16")
    data = full.read_bytes()
    files["truncated"] = tmp_path / "truncated.wav"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["garbage"] = tmp_path / "garbage.wav"
    files["garbage"].write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    files["nan"] = tmp_path / "nan.wav"
    bad = good.copy()
    bad[100] = np.nan
    sf.write(files["nan"], bad, 16000, subtype="FLOAT")
    files["missing"] = tmp_path / "missing.wav"
    return files


EXPECTED = {
    "short": "too short",
    "silent": "silent",
    "truncated": "truncated",
    "garbage": "unreadable",
    "nan": "non-finite",
    "missing": "no such file",
}


def test_bad_files_are_named_with_their_problem(tmp_path):
    for name, path in bad_files(tmp_path).items():
        with pytest.raises(AudioError) as info:
            load_audio(path)
        assert str(path) in str(info.value) and EXPECTED[name] in info.value.problem


def test_embed_batch_goes_on_past_bad_files(tmp_path, tiny_model):
    good = []
    for i in range(3):
        path = tmp_path / f"good{i}.flac"
        sf.write(path, speech_like(0.8 + 0.4 * i, 22050, seed=i), 22050)
        good.append(path)
    bad = bad_files(tmp_path)
    order = [good[0], bad["short"], bad["truncated"], good[1], bad["garbage"], good[2], bad["nan"]]
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join(p.name for p in order[3:]) + "\n")
    out = tmp_path / "emb"
    args = ["ecapa", "embed", *map(str, order[:3]), "--manifest", str(manifest)]
    args += ["--model", str(tiny_model), "--out", str(out), "--batch-size", "2", "--no-progress"]
    assert main(args) == 1  # some inputs failed
    emb = np.load(out / "embeddings.npy")
    rows = list(csv.DictReader((out / "index.csv").open()))
    assert [r["path"] for r in rows] == [str(p) for p in good]
    assert emb.shape == (3, 192) and np.isfinite(emb).all()
    errors = {r["path"]: r["error"] for r in csv.DictReader((out / "errors.csv").open())}
    assert set(errors) == {str(bad[k]) for k in ("short", "truncated", "garbage", "nan")}
    assert "too short" in errors[str(bad["short"])]
    # Nothing a user made is overwritten without --overwrite.
    assert main(args) == 2
    assert main([*args, "--overwrite"]) == 1
