"""Relative lengths (SpeechBrain's convention) to frame counts and masks."""

from __future__ import annotations

import torch


def relative_to_frames(
    lengths: torch.Tensor | None, batch: int, max_len: int, device
) -> torch.Tensor:
    """Valid frames per item, ``[B]`` int64, for relative lengths in ``[0, 1]``.

    Frame ``t`` is valid when ``t < lengths[b] * max_len``, exactly as SpeechBrain's
    ``length_to_mask(lengths * L, max_len=L)``; ``None`` means every frame is valid.
    """
    if lengths is None:
        return torch.full((batch,), max_len, dtype=torch.long, device=device)
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape [{batch}], got {tuple(lengths.shape)}")
    if not lengths.is_floating_point():
        raise TypeError(f"lengths must be relative (floating point in [0, 1]), got {lengths.dtype}")
    return torch.ceil(lengths.to(device) * max_len).clamp(0, max_len).long()


def frame_mask(frames: torch.Tensor, max_len: int) -> torch.Tensor:
    """Boolean ``[B, max_len]``: ``True`` at the first ``frames[b]`` positions."""
    return torch.arange(max_len, device=frames.device) < frames[:, None]
