"""Dense scaled-dot-product attention, the entry point every app uses.

``attention(q, k, v)`` computes ``softmax(q k^T * scale + mask) v`` on tensors in the layout
of :func:`torch.nn.functional.scaled_dot_product_attention`: ``q`` is ``[B, H, Nq, D]``,
``k`` is ``[B, H_kv, Nk, D]`` and ``v`` is ``[B, H_kv, Nk, Dv]`` with ``H % H_kv == 0``
(grouped-query / multi-query attention when ``H_kv < H``). The result is ``[B, H, Nq, Dv]``.

Semantics shared by every backend:

* ``attn_mask``: boolean (``True`` = may attend) or additive float, broadcastable to
  ``[B, H, Nq, Nk]``.
* ``causal=True``: query ``i`` attends keys ``j <= i`` (top-left aligned when ``Nq != Nk``),
  exactly as ``scaled_dot_product_attention(is_causal=True)``.
* ``key_lengths``: integer tensor ``[B]``; keys at positions ``>= key_lengths[b]`` are
  ignored for batch item ``b``. This is the form for padded variable-length batches and it
  never builds a dense ``Nq x Nk`` mask.
* A query row that may attend to no key at all returns zeros (not NaN), and its gradient
  is zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from core_attention import backends, cpu_attention

__all__ = ["attention", "triton_unsupported_reason"]


def _check_inputs(q, k, v, attn_mask, key_lengths) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, N, D], got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.is_floating_point():
        raise TypeError(f"attention needs floating-point tensors, got {q.dtype}")
    b, h, _, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {b}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(
            f"k {tuple(k.shape)} and v {tuple(v.shape)} need the same heads and length"
        )
    if k.shape[3] != d:
        raise ValueError(f"q and k head dims differ: {d} vs {k.shape[3]}")
    if h % k.shape[1] != 0:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({k.shape[1]})")
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
        try:
            torch.broadcast_shapes(attn_mask.shape, (b, h, q.shape[2], k.shape[2]))
        except RuntimeError:
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                f"[B, H, Nq, Nk] = {[b, h, q.shape[2], k.shape[2]]}"
            ) from None
    if key_lengths is not None and (key_lengths.shape != (b,) or key_lengths.is_floating_point()):
        raise ValueError(
            f"key_lengths must be an integer tensor of shape [{b}], got "
            f"{key_lengths.dtype} {tuple(key_lengths.shape)}"
        )


def triton_unsupported_reason(
    q, k, v, *, attn_mask=None, causal=False, dropout_p=0.0, key_lengths=None
) -> str | None:
    """``None`` when a Triton kernel runs this call, else why it cannot."""
    import attention_kernels

    why = attention_kernels.device_unsupported_reason(q.device)
    if why is not None:
        return why
    ok, why = attention_kernels.triton_status()
    if not ok:
        return why
    if "dense_attention" not in attention_kernels.available_kernels():
        return "attention_kernels provides no dense attention kernel in this install"
    if attn_mask is not None:
        return (
            "attn_mask is not supported by the Triton kernel "
            "(use key_lengths for padding and causal=True for causal masking)"
        )
    if dropout_p != 0.0:
        return f"dropout_p={dropout_p} is not supported by the Triton kernel (only 0.0)"
    from attention_kernels.flash_attention import unsupported_reason

    return unsupported_reason(q, k, v, key_lengths=key_lengths)


def _combine(mask_a: torch.Tensor | None, mask_b: torch.Tensor, dtype) -> torch.Tensor:
    """Combine an optional user mask with a boolean mask (both broadcastable)."""
    if mask_a is None:
        return mask_b
    if mask_a.dtype == torch.bool:
        return mask_a & mask_b
    return mask_a.to(dtype).masked_fill(~mask_b, float("-inf"))


def _sdpa(q, k, v, mask, causal, scale, dropout_p):
    # A Python branch, not a bool of shapes: under dynamic-shape compilation the comparison
    # is symbolic, and SDPA's enable_gqa needs a plain bool (dynamo guards on the branch).
    gqa = True if k.shape[1] != q.shape[1] else False  # noqa: SIM210
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=scale, enable_gqa=gqa
    )


def _rows_without_keys(mask: torch.Tensor) -> torch.Tensor:
    """Boolean ``[..., Nq, 1]``: rows of ``mask`` that allow no key."""
    if mask.dtype == torch.bool:
        return ~mask.any(dim=-1, keepdim=True)
    return torch.isneginf(mask).all(dim=-1, keepdim=True)


def _torch_attention(q, k, v, attn_mask, causal, scale, dropout_p, key_lengths):
    nq, nk = q.shape[2], k.shape[2]
    if key_lengths is None:
        if attn_mask is None:
            # Causal rows always see key 0, so there is no empty row unless Nk == 0.
            return _sdpa(q, k, v, None, causal, scale, dropout_p)
        mask = attn_mask
        if causal:
            tril = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril()
            mask = _combine(mask, tril, q.dtype)
        out = _sdpa(q, k, v, mask, False, scale, dropout_p)
        return out.masked_fill(_rows_without_keys(mask), 0.0)

    key_valid = torch.arange(nk, device=q.device) < key_lengths.to(q.device)[:, None]  # [B, Nk]
    key_mask = key_valid[:, None, None, :]  # [B, 1, 1, Nk]: broadcast, never Nq x Nk
    empty = (key_lengths.to(q.device) <= 0)[:, None, None, None]
    if causal and attn_mask is None:
        # Row i of item b attends keys j <= min(i, L_b - 1): plain causal attention for
        # rows i < L_b (the causal mask already hides the padding), key-padding attention
        # for the rows at or past L_b. Two masked calls, no dense mask.
        causal_out = _sdpa(q, k, v, None, True, scale, dropout_p)
        padded_out = _sdpa(q, k, v, _combine(None, key_mask, q.dtype), False, scale, dropout_p)
        row = torch.arange(nq, device=q.device)
        past_end = (row[None, :] >= key_lengths.to(q.device)[:, None])[:, None, :, None]
        out = torch.where(past_end, padded_out, causal_out)
        return out.masked_fill(empty, 0.0)
    mask = _combine(attn_mask, key_mask, q.dtype)
    if causal:
        tril = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril()
        mask = _combine(mask, tril, q.dtype)
    out = _sdpa(q, k, v, mask, False, scale, dropout_p)
    if attn_mask is None:
        return out.masked_fill(empty, 0.0)
    return out.masked_fill(_rows_without_keys(mask), 0.0)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    key_lengths: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Scaled-dot-product attention ``softmax(q k^T * scale + mask) v`` (Vaswani et al. 2017).

    Args:
        q: queries ``[B, H, Nq, D]``.
        k: keys ``[B, H_kv, Nk, D]``, ``H % H_kv == 0`` (GQA / MQA when ``H_kv < H``).
        v: values ``[B, H_kv, Nk, Dv]``.
        attn_mask: bool (``True`` = attend) or additive float mask broadcastable to
            ``[B, H, Nq, Nk]``.
        causal: mask keys after the query position (top-left aligned, as SDPA).
        scale: softmax scale, default ``1 / sqrt(D)``.
        dropout_p: dropout on the attention probabilities (pass ``0.0`` at inference).
        key_lengths: ``[B]`` integer count of valid keys per batch item.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :mod:`core_attention.backends`).

    Returns:
        ``[B, H, Nq, Dv]`` in the dtype of ``q``; rows with no admissible key are zero.
    """
    _check_inputs(q, k, v, attn_mask, key_lengths)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    requested = backends.requested_backend(backend)
    if requested == "torch":
        chosen = "torch"
    else:
        why = triton_unsupported_reason(
            q,
            k,
            v,
            attn_mask=attn_mask,
            causal=causal,
            dropout_p=dropout_p,
            key_lengths=key_lengths,
        )
        chosen = backends.resolve(backend, why)
    if chosen == "triton":
        from attention_kernels.flash_attention import flash_attn_func

        return flash_attn_func(q, k, v, causal=causal, scale=scale, key_lengths=key_lengths)
    if k.shape[2] == 0:
        return q.new_zeros(*q.shape[:3], v.shape[-1])
    if requested == "auto" and q.device.type == "cpu":
        why_not = cpu_attention.unsupported_reason(
            q, k, v, attn_mask=attn_mask, causal=causal, dropout_p=dropout_p
        )
        if why_not is None:
            return cpu_attention.small_head_attention(q, k, v, scale, key_lengths)
    return _torch_attention(q, k, v, attn_mask, causal, scale, dropout_p, key_lengths)
