"""Paired clean/noisy training data: two folders with the same file names, or a CSV
manifest with ``clean`` and ``noisy`` columns. Samples are random crops of equal position in
both signals, ``[samples]`` float32 at 16 kHz."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from attn_speech.audio import AudioError, load_audio
from attn_speech.enhance.inference import AUDIO_SUFFIXES

__all__ = ["PairedSpeech", "find_pairs"]


def find_pairs(
    clean_dir: str | Path | None = None,
    noisy_dir: str | Path | None = None,
    manifest: str | Path | None = None,
) -> list[tuple[Path, Path]]:
    """``(clean, noisy)`` paths from two folders (matched by relative path) or a manifest
    (relative paths are relative to the manifest's folder)."""
    if manifest is not None:
        manifest = Path(manifest)
        with manifest.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"clean", "noisy"} <= set(reader.fieldnames):
                raise ValueError(f"{manifest}: needs 'clean' and 'noisy' columns")
            rows = [(manifest.parent / r["clean"], manifest.parent / r["noisy"]) for r in reader]
        if not rows:
            raise ValueError(f"{manifest}: no rows")
        return rows
    if clean_dir is None or noisy_dir is None:
        raise ValueError("give a manifest, or both a clean and a noisy folder")
    clean_dir, noisy_dir = Path(clean_dir), Path(noisy_dir)
    pairs, missing = [], []
    for clean in sorted(clean_dir.rglob("*")):
        if clean.suffix.lower() not in AUDIO_SUFFIXES:
            continue
        noisy = noisy_dir / clean.relative_to(clean_dir)
        (pairs if noisy.is_file() else missing).append((clean, noisy))
    if missing:
        raise ValueError(f"{len(missing)} clean files have no noisy twin, e.g. {missing[0][1]}")
    if not pairs:
        raise ValueError(f"{clean_dir}: no audio files")
    return pairs


class PairedSpeech(torch.utils.data.Dataset):
    """``dataset[i]`` -> ``(clean, noisy)`` crops of ``segment`` samples (zero-padded when
    the pair is shorter), at a random position drawn from torch's generator."""

    def __init__(
        self, pairs: list[tuple[Path, Path]], segment: int = 32000, sample_rate: int = 16000
    ) -> None:
        self.pairs = pairs
        self.segment = segment
        self.sample_rate = sample_rate

    def __len__(self) -> int:
        return len(self.pairs)

    def sample_path(self, i: int) -> str:
        return str(self.pairs[i][1])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        clean_path, noisy_path = self.pairs[i]
        clean = load_audio(clean_path, self.sample_rate, min_seconds=0.0, silence_db=-200.0)
        noisy = load_audio(noisy_path, self.sample_rate, min_seconds=0.0, silence_db=-200.0)
        if abs(clean.numel() - noisy.numel()) > self.sample_rate // 100:
            raise AudioError(
                noisy_path, f"{noisy.numel()} samples, its clean twin has {clean.numel()}"
            )
        n = min(clean.numel(), noisy.numel())
        clean, noisy = clean[:n], noisy[:n]
        if n >= self.segment:
            start = int(torch.randint(0, n - self.segment + 1, ()))
            return clean[start : start + self.segment], noisy[start : start + self.segment]
        pad = (0, self.segment - n)
        return torch.nn.functional.pad(clean, pad), torch.nn.functional.pad(noisy, pad)
