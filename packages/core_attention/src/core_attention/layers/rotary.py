"""Rotary position embedding (RoPE; Su et al. 2021, "RoFormer: Enhanced Transformer with
Rotary Position Embedding", arXiv:2104.09864).

Channel pairs ``(x[2i], x[2i+1])`` of a head are rotated by the angle
``position * base ** (-2i / dim)`` (the interleaved layout of the paper). Because every pair
is adjacent, tables for several axes concatenate along the last dimension: a video model
builds ``cos``/``sin`` for time, height and width with three :class:`RotaryEmbedding` of
dims ``d_t + d_h + d_w <= head_dim`` and ``torch.cat`` s them.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RotaryEmbedding", "apply_rotary"]


class RotaryEmbedding(nn.Module):
    """Cos/sin tables of 1D rotary position embedding for given positions.

    Args:
        dim: rotated channels per head (even); may be smaller than the head dim, the rest
            of the head passes through unrotated.
        base: frequency base, ``10000`` in RoFormer.

    Shapes:
        ``forward(positions)``: ``positions`` ``[N]`` or ``[B, N]`` (integer or float, e.g.
        frame indices of a video); returns ``(cos, sin)``, each ``[N, dim]`` or
        ``[B, N, dim]`` in the dtype of the module's buffer (float32 unless converted).
    """

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError(f"rotary dim must be a positive even number, got {dim}")
        self.dim = dim
        self.base = base
        inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(self.inv_freq.dtype)[..., None] * self.inv_freq
        angles = angles.repeat_interleave(2, dim=-1)
        return angles.cos(), angles.sin()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}"


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of ``x`` in adjacent pairs.

    Args:
        x: ``[B, H, N, D]``.
        cos, sin: ``[N, R]`` or ``[B, N, R]`` from :class:`RotaryEmbedding`, ``R <= D`` even.

    Returns:
        ``[B, H, N, D]`` in the dtype of ``x``.
    """
    rot = cos.shape[-1]
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")
    if rot > x.shape[-1] or rot % 2:
        raise ValueError(f"rotary width {rot} must be even and <= head dim {x.shape[-1]}")
    if cos.shape[-2] != x.shape[-2]:
        raise ValueError(f"rotary tables cover {cos.shape[-2]} positions, x has {x.shape[-2]}")
    if cos.dim() == 3:  # [B, N, R] -> [B, 1, N, R], one table per batch item
        cos, sin = cos[:, None], sin[:, None]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    even, odd = x_rot[..., 0::2], x_rot[..., 1::2]
    swapped = torch.stack((-odd, even), dim=-1).flatten(-2)
    return torch.cat((x_rot * cos + swapped * sin, x_pass), dim=-1)
