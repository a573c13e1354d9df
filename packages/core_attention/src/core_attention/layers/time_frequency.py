"""Time-frequency attention with weights shared between the two axes (MambAttention; Kühne et
al. 2025, "MambAttention: Mamba with Multi-Head Attention for Generalizable Single-Channel
Speech Enhancement", arXiv:2507.00966).
"""

from __future__ import annotations

import torch
from torch import nn

from core_attention.layers.multi_head import MultiHeadAttention

__all__ = ["TimeFrequencyAttention"]


class TimeFrequencyAttention(nn.Module):
    """One multi-head self-attention applied along time or along frequency of a spectrogram
    feature map, the same projection weights for both axes.

    Along time, each ``(b, f)`` is a sequence of ``T`` frames: ``x`` is reshaped to
    ``[B*F, T, C]``; along frequency, each ``(b, t)`` is a sequence of ``F`` bins:
    ``[B*T, F, C]``. Each axis has its own LayerNorm before the attention (the paper's
    ``X + MHA(LN(X))``), the attention module :attr:`attn` is one
    :class:`~core_attention.layers.multi_head.MultiHeadAttention` shared by both.
    A MambAttention block calls ``axis="time"``, its time-Mamba, ``axis="freq"``, its
    frequency-Mamba.

    Args:
        channels: channels ``C`` of the feature map (the attention width).
        num_heads: attention heads (``channels % num_heads == 0``).
        qkv_bias: bias in the q, k, v projections.
        residual: add the input to the attention output.
        norm_eps: LayerNorm epsilon.
        attn_drop: dropout on attention probabilities (training mode only).
        proj_drop: dropout after the output projection.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` for :func:`core_attention.attention`.

    Shapes:
        ``forward(x, axis, key_lengths=None)``: ``x`` ``[B, C, T, F]``; ``axis`` ``"time"``
        or ``"freq"``; ``key_lengths`` ``[B]`` integer count of valid frames of padded
        batches, which masks padded frames out of time attention (frequency attention
        mixes bins of one frame only, so padded frames never reach valid ones; their own
        outputs are not meaningful). Returns ``[B, C, T, F]``.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 4,
        *,
        qkv_bias: bool = True,
        residual: bool = True,
        norm_eps: float = 1e-5,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.residual = residual
        self.norm_time = nn.LayerNorm(channels, eps=norm_eps)
        self.norm_freq = nn.LayerNorm(channels, eps=norm_eps)
        self.attn = MultiHeadAttention(
            channels,
            num_heads,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            backend=backend,
        )

    def forward(
        self, x: torch.Tensor, axis: str, key_lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"x must be [B, C, T, F], got shape {tuple(x.shape)}")
        b, c, t, f = x.shape
        if key_lengths is not None and key_lengths.shape != (b,):
            raise ValueError(f"key_lengths must have shape [{b}], got {tuple(key_lengths.shape)}")
        if axis == "time":
            seq = x.permute(0, 3, 2, 1).reshape(b * f, t, c)
            lengths = None if key_lengths is None else key_lengths.repeat_interleave(f)
            out = self.attn(self.norm_time(seq), key_lengths=lengths)
            if self.residual:
                out = out + seq
            return out.view(b, f, t, c).permute(0, 3, 2, 1)
        if axis == "freq":
            seq = x.permute(0, 2, 3, 1).reshape(b * t, f, c)
            out = self.attn(self.norm_freq(seq))
            if self.residual:
                out = out + seq
            return out.view(b, t, f, c).permute(0, 3, 1, 2)
        raise ValueError(f"axis must be 'time' or 'freq', got {axis!r}")
