"""Speech enhancement of a noisy espeak-ng clip with the shipped MambAttention.

The ``attn-demo`` stage of attn-speech's enhancement part (MambAttention, Kühne et al.
2025). An espeak-ng sentence by a voice drawn with a fixed seed is mixed with
pink noise at 5 dB SNR (a noise type of the training data) and brown noise at -10 dB (never
seen in training); the small model shipped with attn-speech
(``apps/speech/recipes/enhance_espeak.sh``) enhances both. The report shows spectrograms,
audio players and PESQ / ESTOI / SI-SDR of the noisy and the enhanced signal.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from attn_speech.corpus import make_voices, require_espeak, synthesise
from attn_speech.enhance.cli import builtin_model_path
from attn_speech.enhance.inference import enhance_waveform
from attn_speech.enhance.metrics import score
from attn_speech.enhance.model import MambAttention
from attn_speech.enhance.noisy_corpus import colored_noise, mix_at_snr
from core_attention.demo import Artifact, Stage, StageContext, StageResult

SAMPLE_RATE = 16000
# noise: (spectral exponent, SNR in dB, note); brown noise sits below a few hundred Hz and
# barely masks speech at 0 dB
NOISES = {"pink": (1.0, 5.0, "seen in training"), "brown": (2.0, -10.0, "never seen in training")}
TEXT = "the birch canoe slid on the smooth planks, glue the sheet to the dark blue background"


def make_clip(seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Clean speech and ``{noise: noisy}`` (pink at 5 dB SNR, brown at -10 dB), float64
    ``[samples]`` at 16 kHz."""
    require_espeak()
    # A seed unlike the recipe's corpus (0), so the voice is a new draw.
    voice = make_voices(1, seed=2000 + seed)[0]
    speech = synthesise(voice, TEXT, random.Random(seed)).astype(np.float64)
    speech *= 0.25 / np.abs(speech).max()
    rng = np.random.default_rng([seed, 7])
    noisy = {}
    for name, (exponent, snr, _) in NOISES.items():
        c, n = mix_at_snr(speech, colored_noise(speech.size, exponent, rng), snr)
        noisy[name] = n * (np.abs(speech).max() / np.abs(c).max())  # undo any anti-clip scaling
    return speech, noisy


def _spectrogram(ax, wav: np.ndarray, title: str) -> None:
    spec = np.abs(
        torch.stft(
            torch.from_numpy(wav).float(),
            512,
            128,
            window=torch.hann_window(512),
            return_complex=True,
        ).numpy()
    )
    db = 20 * np.log10(spec + 1e-6)
    ax.imshow(
        db,
        origin="lower",
        aspect="auto",
        cmap="magma",
        vmin=db.max() - 80,
        vmax=db.max(),
        extent=(0, wav.size / SAMPLE_RATE, 0, SAMPLE_RATE / 2000),
    )
    ax.set_title(title, fontsize=9)
    ax.set_ylabel("kHz")


def spectrogram_figure(signals: dict[str, np.ndarray], path: Path) -> Path:
    """One spectrogram per signal, stacked, sharing the time axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(signals), 1, figsize=(8, 1.8 * len(signals)), sharex=True)
    for ax, (title, wav) in zip(axes, signals.items(), strict=True):
        _spectrogram(ax, wav, title)
    axes[-1].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def run(ctx: StageContext) -> StageResult:
    folder = builtin_model_path()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: this install ships no enhancement model")
    model = MambAttention.from_pretrained(folder).eval().to(ctx.device)
    clean, noisy = make_clip(ctx.seed)
    out = ctx.out_dir
    audio = [Artifact("audio", "clean speech", _write(out / "clean.wav", clean))]
    signals = {"clean": clean}
    rows = [("noise", "metric", "noisy", "enhanced")]
    gains = []
    for name, wav in noisy.items():
        enhanced = enhance_waveform(model, torch.from_numpy(wav).float()).double().numpy()
        before, after = score(clean, wav), score(clean, enhanced)
        _, snr, note = NOISES[name]
        label = f"{name} noise at {snr:g} dB SNR, {note}"
        for metric, shown in (("pesq", "PESQ (wb)"), ("estoi", "ESTOI"), ("si_sdr", "SI-SDR dB")):
            rows.append((label, shown, f"{before[metric]:.2f}", f"{after[metric]:.2f}"))
        gains.append(
            f"{name}: PESQ {before['pesq']:.2f}->{after['pesq']:.2f}, "
            f"SI-SDR {before['si_sdr']:.1f}->{after['si_sdr']:.1f} dB"
        )
        signals[f"noisy ({label})"] = wav
        signals[f"enhanced ({name} noise)"] = enhanced
        audio.append(Artifact("audio", f"noisy: {label}", _write(out / f"noisy_{name}.wav", wav)))
        audio.append(
            Artifact(
                "audio",
                f"enhanced: {name} noise",
                _write(out / f"enhanced_{name}.wav", enhanced),
            )
        )
    fig = spectrogram_figure(signals, out / "spectrograms.png")
    params = sum(p.numel() for p in model.parameters())
    return StageResult(
        summary="; ".join(gains),
        artifacts=[
            Artifact("image", "Spectrograms: clean, then noisy and enhanced for each noise.", fig),
            Artifact("table", "Quality against the clean speech.", rows=rows),
            *audio,
            Artifact(
                "text",
                "model",
                text=f"shipped MambAttention, {params / 1e6:.2f} M parameters ({folder.name})",
            ),
        ],
    )


def _write(path: Path, wav: np.ndarray) -> Path:
    sf.write(path, wav.astype(np.float32), SAMPLE_RATE, subtype="FLOAT")
    return path


STAGE = Stage(
    name="speech-enhancement",
    title="attn-speech: MambAttention speech enhancement",
    description=__doc__.strip().splitlines()[0],
    run=run,
    order=11,
)
