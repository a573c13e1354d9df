"""Relative lengths (SpeechBrain's convention) and exact frame counts.

SpeechBrain passes a padded batch with relative lengths ``l`` in ``[0, 1]``; frame ``t`` of
a ``T``-frame tensor is valid when ``t < l * T``, so an item has ``ceil(l * T)`` valid
frames. ``float32(f / T) * T`` can land one ulp above ``f`` and add a frame, so
:func:`relative_from_frames` nudges each length until the count comes back exactly.
"""

from __future__ import annotations

import torch


def frames_from_relative(lengths: torch.Tensor | None, batch: int, max_len: int) -> torch.Tensor:
    """Valid frames per item ``[B]`` (int64): ``ceil(lengths * max_len)`` clamped to ``max_len``."""
    if lengths is None:
        return torch.full((batch,), max_len, dtype=torch.long)
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape [{batch}], got {tuple(lengths.shape)}")
    return torch.ceil(lengths.float() * max_len).clamp(0, max_len).long().cpu()


def relative_from_frames(frames: torch.Tensor, max_len: int) -> torch.Tensor:
    """float32 relative lengths ``l`` ``[B]`` with ``ceil(l * max_len) == frames`` exactly."""
    frames = frames.long().cpu()
    rel = (frames.double() / max_len).float()
    for _ in range(8):
        count = torch.ceil(rel * max_len).long()
        if torch.equal(count, frames):
            return rel
        down = torch.nextafter(rel, torch.zeros_like(rel))
        up = torch.nextafter(rel, torch.ones_like(rel))
        rel = torch.where(count > frames, down, torch.where(count < frames, up, rel))
    raise RuntimeError(f"cannot represent frame counts {frames.tolist()} of {max_len}")


def samples_to_frames(samples: torch.Tensor, hop: int) -> torch.Tensor:
    """Frames of a centred STFT (``center=True``): ``samples // hop + 1``."""
    return samples.long() // hop + 1


def frame_mask(frames: torch.Tensor, max_len: int, device=None) -> torch.Tensor:
    """Boolean ``[B, max_len]``, ``True`` on the first ``frames[b]`` positions."""
    return torch.arange(max_len, device=device) < frames.to(device)[:, None]
