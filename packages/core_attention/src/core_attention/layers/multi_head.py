"""Multi-head attention with grouped-query heads, rotary embedding and qk-norm.

Papers: Vaswani et al. 2017 ("Attention Is All You Need", multi-head attention);
Ainslie et al. 2023 ("GQA", grouped-query attention); Su et al. 2021 ("RoFormer", rotary
position embedding); Dehghani et al. 2023 ("Scaling Vision Transformers to 22 Billion
Parameters", qk-norm).
"""

from __future__ import annotations

import torch
from torch import nn

from core_attention.functional import attention
from core_attention.layers.rotary import apply_rotary

__all__ = ["MultiHeadAttention", "make_qk_norm"]

Rope = tuple[torch.Tensor, torch.Tensor]


def make_qk_norm(kind: str | None, head_dim: int, eps: float) -> nn.Module:
    """Per-head normalisation of queries or keys: ``"rms"``, ``"layer"`` or ``None``."""
    if kind is None:
        return nn.Identity()
    if kind == "rms":
        return nn.RMSNorm(head_dim, eps=eps)
    if kind == "layer":
        return nn.LayerNorm(head_dim, eps=eps)
    raise ValueError(f"qk_norm must be 'rms', 'layer' or None, got {kind!r}")


def head_layout(
    dim: int, num_heads: int, num_kv_heads: int | None, head_dim: int | None
) -> tuple[int, int]:
    """Checked ``(num_kv_heads, head_dim)``: K/V heads default to ``num_heads`` and must
    divide it; the head dim defaults to ``dim / num_heads``."""
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads")
    if head_dim is None:
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) is not divisible by num_heads ({num_heads})")
        head_dim = dim // num_heads
    return num_kv_heads, head_dim


class MultiHeadAttention(nn.Module):
    """Self or cross multi-head attention on token sequences.

    ``q = x W_q``, ``k = c W_k``, ``v = c W_v`` (``c = x`` for self attention, else
    ``context``), split into heads, optional per-head qk-norm, optional rotary embedding,
    ``softmax(q k^T * scale + mask) v`` through :func:`core_attention.attention`, heads
    merged and projected by ``W_o``.

    Args:
        dim: channels ``C`` of ``x`` and of the output.
        num_heads: query heads ``H``.
        num_kv_heads: key/value heads ``H_kv`` (``H % H_kv == 0``); default ``H``.
            ``H_kv < H`` is grouped-query attention, ``H_kv = 1`` multi-query attention.
        head_dim: channels per head; default ``dim // num_heads``.
        context_dim: channels of ``context`` for cross attention; default ``dim``.
        qkv_bias: bias in the q, k, v projections.
        out_bias: bias in the output projection.
        qk_norm: ``"rms"`` (RMSNorm), ``"layer"`` (LayerNorm) or ``None``, applied per head
            to q and k before the rotary embedding.
        norm_eps: epsilon of the qk-norm.
        scale: softmax scale, default ``head_dim ** -0.5``.
        attn_drop: dropout on attention probabilities (training mode only).
        proj_drop: dropout after the output projection.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``, passed to
            :func:`core_attention.attention`.

    Shapes:
        ``forward(x, context=None, *, attn_mask=None, key_lengths=None, causal=False,
        rope=None, rope_context=None)``:

        * ``x``: ``[B, N, C]``; ``context``: ``[B, M, C_ctx]`` (``M = N`` when absent);
        * ``attn_mask``: bool (``True`` = attend) or additive, broadcastable to
          ``[B, H, N, M]``;
        * ``key_lengths``: ``[B]`` integer count of valid context (or ``x``) tokens;
        * ``rope``: ``(cos, sin)`` of :class:`~core_attention.layers.rotary.RotaryEmbedding`
          for the positions of ``x`` (``[N, R]`` or ``[B, N, R]``), applied to queries and,
          in self attention, to keys; ``rope_context``: the same for the ``M`` context
          positions (needed for rotary cross attention);
        * returns ``[B, N, C]``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        context_dim: int | None = None,
        qkv_bias: bool = False,
        out_bias: bool = True,
        qk_norm: str | None = None,
        norm_eps: float = 1e-6,
        scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        num_kv_heads, head_dim = head_layout(dim, num_heads, num_kv_heads, head_dim)
        context_dim = dim if context_dim is None else context_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        self.attn_drop = attn_drop
        self.backend = backend

        self.q_proj = nn.Linear(dim, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(context_dim, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(context_dim, num_kv_heads * head_dim, bias=qkv_bias)
        self.q_norm = make_qk_norm(qk_norm, head_dim, norm_eps)
        self.k_norm = make_qk_norm(qk_norm, head_dim, norm_eps)
        self.out_proj = nn.Linear(num_heads * head_dim, dim, bias=out_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        attn_mask: torch.Tensor | None = None,
        key_lengths: torch.Tensor | None = None,
        causal: bool = False,
        rope: Rope | None = None,
        rope_context: Rope | None = None,
    ) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"x must be [B, N, C], got shape {tuple(x.shape)}")
        self_attention = context is None
        if self_attention:
            context = x
            rope_context = rope
        elif rope is not None and rope_context is None:
            raise ValueError("rotary cross attention needs rope_context for the context tokens")
        b, n, _ = x.shape
        m = context.shape[1]
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(context).view(b, m, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(context).view(b, m, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q = apply_rotary(q, *rope)
        if rope_context is not None:
            k = apply_rotary(k, *rope_context)
        out = attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            causal=causal,
            scale=self.scale,
            dropout_p=self.attn_drop if self.training else 0.0,
            key_lengths=key_lengths,
            backend=self.backend,
        )
        out = out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return self.proj_drop(self.out_proj(out))

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, backend={self.backend!r}"
        )
