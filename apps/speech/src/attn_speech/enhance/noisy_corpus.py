"""``attn-speech make-data noisy``: offline clean/noisy pairs for speech enhancement.

Clean speech is synthesised with espeak-ng (the voices and sentences of
:mod:`attn_speech.corpus`) and mixed with noise at a signal-to-noise ratio drawn uniformly
from ``snr_range`` (power over the whole utterance). Noise types:

* ``white``; ``pink`` (power ~ 1/f) and ``brown`` (~ 1/f^2), shaped in the FFT domain;
* ``babble``: three to five utterances of other espeak-ng voices (never the clean speakers)
  summed;
* ``hum``: mains hum, a 50 or 60 Hz fundamental with harmonics up to 1 kHz;
* ``folder``: random excerpts of the files in ``noise_dir``.

Three splits, each with its own speakers: ``train`` and ``test`` use ``train_noises``;
``test_unseen`` uses ``unseen_noises`` only, for an out-of-domain score (the comparison
MambAttention reports, Kühne et al. 2025). Layout::

    OUT/<split>/clean/<id>.wav   OUT/<split>/noisy/<id>.wav   (16 kHz, 16-bit)
    OUT/<split>.csv              columns clean,noisy,noise,snr_db (paths relative to OUT)
    OUT/corpus.json              the options and counts

``attn-speech enhance train --manifest OUT/train.csv`` reads the manifests as they are.
"""

from __future__ import annotations

import csv
import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf

from attn_speech.audio import load_audio
from attn_speech.corpus import make_voices, require_espeak, sentence, synthesise
from attn_speech.enhance.inference import AUDIO_SUFFIXES
from attn_speech.outputs import replace_folder

__all__ = ["NOISE_TYPES", "colored_noise", "hum", "make_noisy_corpus", "mix_at_snr"]

SAMPLE_RATE = 16000
NOISE_TYPES = ("white", "pink", "brown", "babble", "hum", "folder")
PEAK = 0.99


def colored_noise(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise whose power spectrum falls as ``1 / f**exponent`` (0 white, 1 pink,
    2 brown), unit RMS."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    f[0] = f[1] if n > 1 else 1.0
    x = np.fft.irfft(spec / f ** (exponent / 2), n)
    return x / (np.sqrt(np.mean(x**2)) + 1e-12)


def hum(n: int, rng: np.random.Generator) -> np.ndarray:
    """Mains hum: 50 or 60 Hz (+-0.5 Hz) and its harmonics below 1 kHz, amplitudes ~1/k
    with random phases, unit RMS."""
    f0 = rng.choice([50.0, 60.0]) + rng.uniform(-0.5, 0.5)
    t = np.arange(n) / SAMPLE_RATE
    x = sum(
        np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi)) / k
        for k in range(1, int(1000 // f0) + 1)
    )
    return x / np.sqrt(np.mean(x**2))


def _fit(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` samples of ``x`` from a random offset, looping when ``x`` is shorter."""
    reps = -(-(n + x.size) // x.size)
    start = int(rng.integers(0, x.size))
    return np.tile(x, reps)[start : start + n]


def mix_at_snr(
    clean: np.ndarray, noise: np.ndarray, snr_db: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(clean, noisy)`` with ``noisy = clean + g * noise`` at ``snr_db`` dB, both scaled
    down together when the mixture would clip (the SNR is unchanged)."""
    ps, pn = np.mean(clean**2), np.mean(noise**2)
    noisy = clean + noise * np.sqrt(ps / (pn * 10 ** (snr_db / 10)))
    scale = min(1.0, PEAK / max(np.abs(noisy).max(), np.abs(clean).max()))
    return clean * scale, noisy * scale


class _NoiseMaker:
    def __init__(self, babble: list[np.ndarray], folder: list[np.ndarray]) -> None:
        self.babble, self.folder = babble, folder

    def __call__(self, kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
        if kind in ("white", "pink", "brown"):
            return colored_noise(n, {"white": 0, "pink": 1, "brown": 2}[kind], rng)
        if kind == "hum":
            return hum(n, rng)
        if kind == "babble":
            k = min(len(self.babble), int(rng.integers(3, 6)))
            talkers = rng.choice(len(self.babble), size=k, replace=False)
            return sum(_fit(self.babble[i], n, rng) for i in talkers)
        if kind == "folder":
            return _fit(self.folder[int(rng.integers(0, len(self.folder)))], n, rng)
        raise ValueError(f"unknown noise type {kind!r}; choose from {', '.join(NOISE_TYPES)}")


def _read_noise_folder(noise_dir: str | Path) -> list[np.ndarray]:
    files = sorted(
        f for f in Path(noise_dir).rglob("*") if f.is_file() and f.suffix.lower() in AUDIO_SUFFIXES
    )
    out = [load_audio(f, SAMPLE_RATE, min_seconds=0.1, silence_db=-80.0).numpy() for f in files]
    if not out:
        raise ValueError(f"{noise_dir}: no audio files")
    return out


def make_noisy_corpus(
    out: str | Path,
    train: int = 200,
    test: int = 40,
    snr_range: tuple[float, float] = (-5.0, 15.0),
    train_noises: tuple[str, ...] = ("white", "pink", "babble"),
    unseen_noises: tuple[str, ...] = ("brown", "hum"),
    noise_dir: str | Path | None = None,
    speakers: int = 24,
    seed: int = 0,
    workers: int = 2,
    overwrite: bool = False,
) -> dict:
    """Write the corpus (layout in the module docstring); returns its summary."""
    out = Path(out)
    for kind in (*train_noises, *unseen_noises):
        if kind not in NOISE_TYPES:
            raise ValueError(f"unknown noise type {kind!r}; choose from {', '.join(NOISE_TYPES)}")
    if overlap := set(train_noises) & set(unseen_noises):
        raise ValueError(f"noise types both seen and unseen: {', '.join(sorted(overlap))}")
    if "folder" in (*train_noises, *unseen_noises) and noise_dir is None:
        raise ValueError("noise type 'folder' needs a noise folder")
    if snr_range[0] > snr_range[1]:
        raise ValueError(f"empty SNR range {snr_range}")
    if speakers < 3 or train < 1 or test < 1:
        raise ValueError("need at least 3 speakers and one train and one test pair")
    replace_folder(out, overwrite)
    require_espeak()
    folder = _read_noise_folder(noise_dir) if noise_dir is not None else []

    # speakers split in three; babble talkers are further voices never used as speech
    voices = make_voices(speakers + 6, seed)
    talkers, speech = voices[speakers:], voices[:speakers]
    third = max(1, speakers // 3)
    split_voices = {
        "train": speech[: speakers - 2 * third],
        "test": speech[speakers - 2 * third : speakers - third],
        "test_unseen": speech[speakers - third :],
    }
    counts = {"train": train, "test": test, "test_unseen": test}
    noises = {"train": train_noises, "test": train_noises, "test_unseen": unseen_noises}

    jobs = []
    for split, n in counts.items():
        for i in range(n):
            r = random.Random(f"{seed}/{split}/{i}")
            jobs.append((split, i, r.choice(split_voices[split]), sentence(r), r))
    babble_jobs = [(v, random.Random(f"{seed}/babble/{k}")) for k, v in enumerate(talkers * 2)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        babble = list(pool.map(lambda j: synthesise(j[0], sentence(j[1]), j[1]), babble_jobs))
        speech_wavs = list(pool.map(lambda j: synthesise(j[2], j[3], j[4]), jobs))
    make_noise = _NoiseMaker(babble, folder)

    rows: dict[str, list[list]] = {s: [] for s in counts}
    for (split, i, voice, _, _), wav in zip(jobs, speech_wavs):
        rng = np.random.default_rng([seed, list(counts).index(split), i])
        kind = noises[split][int(rng.integers(0, len(noises[split])))]
        snr = float(rng.uniform(*snr_range))
        clean, noisy = mix_at_snr(wav.astype(np.float64), make_noise(kind, wav.size, rng), snr)
        name = f"{split}_{i:05d}_{voice.spk_id}.wav"
        for sub, x in (("clean", clean), ("noisy", noisy)):
            (out / split / sub).mkdir(parents=True, exist_ok=True)
            sf.write(out / split / sub / name, x, SAMPLE_RATE, subtype="PCM_16")
        rows[split].append([f"{split}/clean/{name}", f"{split}/noisy/{name}", kind, f"{snr:.2f}"])
    for split, body in rows.items():
        with open(out / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([["clean", "noisy", "noise", "snr_db"], *body])
    summary = {
        "pairs": {s: len(b) for s, b in rows.items()},
        "noises": {s: list(noises[s]) for s in counts},
        "speakers": {s: [v.spk_id for v in vs] for s, vs in split_voices.items()},
        "babble_talkers": [v.spk_id for v in talkers],
        "snr_range": list(snr_range),
        "noise_dir": str(noise_dir) if noise_dir is not None else None,
        "seed": seed,
    }
    (out / "corpus.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
