"""Region-chunked fine level of Bi-Level Routing Attention (BiFormer, Zhu et al., CVPR 2023).

The fine level of BiFormer lets the tokens of query region ``p`` attend the tokens of the
``T`` key regions ``region_idx[b, p]``. The official code gathers the routed keys and values
of every query region at once (a ``T``-fold copy of K and V) and keeps it for the backward
pass. Here the query regions are processed in chunks straight from the projection output
``qkv`` (``[B, Hp, Wp, 2 * qk_dim + dim]``, image order): only one chunk's routed keys and
values are gathered at a time, the output is written back in image order (no region-order
copies of q, k, v or the output), and the backward pass recomputes each chunk's scores from
``qkv`` and the saved log-sum-exp instead of storing them. The arithmetic per chunk is the
official one (one softmax over all ``T * Nk`` routed keys).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from core_attention.functional import attention

__all__ = ["region_attention"]

# Elements of the per-chunk temporaries (gathered K and V, scores): bounds the extra memory
# of one chunk at 4 * _CHUNK_ELEMS bytes (fp32) whatever the batch size.
_CHUNK_ELEMS = 1 << 19


# Routing to at least 1 / _DENSE_FACTOR of all regions: attend every key under a mask. It
# costs up to _DENSE_FACTOR times the routed multiply-adds but runs as one fused attention call,
# which beats gathering many small regions (BiFormer-T stage 3: 16 of 49 regions of 4 tokens).
_DENSE_FACTOR = 4


def _masked_dense(qkv, region_idx, n, m, qk_dim, scale, key_valid):
    """All-pairs attention in image order with a ``[B, 1, L, L]`` routing mask; same result
    as the routed computation (the masked keys have probability 0)."""
    b, hp, wp, c3 = qkv.shape
    h, w, length = hp // n, wp // n, hp * wp
    routed = torch.zeros(b, n * n, n * n, dtype=torch.bool, device=qkv.device)
    routed.scatter_(2, region_idx, True)  # [B, P query regions, P key regions]
    rows = torch.arange(hp, device=qkv.device) // h
    cols = torch.arange(wp, device=qkv.device) // w
    region_of = (rows[:, None] * n + cols[None, :]).reshape(-1)  # [L] token -> region
    mask = routed[:, region_of][:, :, region_of]  # [B, L, L]
    if key_valid is not None:
        token_valid = key_valid.view(n, n, h, w).permute(0, 2, 1, 3).reshape(length)
        mask = mask & token_valid
    q, k, v = qkv.view(b, length, c3).split([qk_dim, qk_dim, c3 - 2 * qk_dim], dim=-1)

    def heads(t: Tensor) -> Tensor:
        return t.view(b, length, m, -1).transpose(1, 2)

    out = attention(heads(q), heads(k), heads(v), attn_mask=mask[:, None], scale=scale)
    return out.transpose(1, 2).reshape(b, hp, wp, -1)


class _Layout:
    """Sizes of one call: ``n`` regions per side of ``h x w`` tokens, ``m`` heads."""

    def __init__(self, qkv: Tensor, n: int, m: int, qk_dim: int, topk: int):
        self.b, hp, wp, c3 = qkv.shape
        self.n, self.m, self.qk, self.topk = n, m, qk_dim, topk
        self.h, self.w = hp // n, wp // n
        self.tokens = self.h * self.w
        self.dim = c3 - 2 * qk_dim
        self.rows = self.b * n * n  # query regions
        per_row = m * self.tokens * (topk * self.tokens) + topk * self.tokens * (c3 - qk_dim)
        # Traced (torch.compile / torch.export): one chunk, so the graph has no loop over a
        # size that may be symbolic.
        compiling = torch.compiler.is_compiling()
        self.chunk = self.rows if compiling else max(1, _CHUNK_ELEMS // per_row)

    def regions(self, t: Tensor) -> Tensor:
        """``[B, Hp, Wp, C]`` -> the view ``[B, n, h, n, w, C]``."""
        return t.view(self.b, self.n, self.h, self.n, self.w, t.shape[-1])

    def spans(self):
        for r0 in range(0, self.rows, self.chunk):
            yield r0, min(r0 + self.chunk, self.rows)


def _index(lay: _Layout, region_idx: Tensor, r0: int, r1: int):
    """Advanced indices of query regions ``r0:r1`` (``[c]``) and their routed regions
    (``[c, T]``) into a ``[B, n, h, n, w, C]`` view."""
    p2 = lay.n * lay.n
    rows = torch.arange(r0, r1, device=region_idx.device)
    b, p = rows // p2, rows % p2
    routed = region_idx.view(-1, lay.topk)[r0:r1]
    return (b, p // lay.n, p % lay.n), (b[:, None], routed // lay.n, routed % lay.n), routed


def _gather(lay: _Layout, q6: Tensor, kv6: Tensor, key_valid, region_idx, r0, r1, scale):
    """Scaled queries ``[c, M, N, dq]``, routed keys ``[c, M, dq, T*N]``, values
    ``[c, M, T*N, dv]`` and the key mask ``[c, 1, 1, T*N]`` (or ``None``) of one chunk."""
    qi, ki, routed = _index(lay, region_idx, r0, r1)
    c, tn, m = r1 - r0, lay.topk * lay.tokens, lay.m
    q = q6[qi[0], qi[1], :, qi[2]].view(c, lay.tokens, m, -1).transpose(1, 2).mul_(scale)
    kv = kv6[ki[0], ki[1], :, ki[2]].view(c, tn, -1)
    k = kv[..., : lay.qk].view(c, tn, m, -1).permute(0, 2, 3, 1)
    v = kv[..., lay.qk :].view(c, tn, m, -1).transpose(1, 2)
    mask = None if key_valid is None else key_valid[routed].view(c, 1, 1, tn)
    return q, k, v, mask, qi, ki


def _scores(q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
    s = torch.matmul(q, k)
    if mask is not None:
        s.masked_fill_(~mask, float("-inf"))
    return s


def _forward(lay: _Layout, qkv: Tensor, region_idx, key_valid, scale, with_lse: bool):
    qkv6 = lay.regions(qkv)
    q6, kv6 = qkv6[..., : lay.qk], qkv6[..., lay.qk :]
    out = qkv.new_empty(*qkv.shape[:3], lay.dim)
    out6 = lay.regions(out)
    lse = qkv.new_empty(lay.rows, lay.m, lay.tokens, 1) if with_lse else None
    for r0, r1 in lay.spans():
        q, k, v, mask, qi, _ = _gather(lay, q6, kv6, key_valid, region_idx, r0, r1, scale)
        s = _scores(q, k, mask)
        row_max = s.amax(-1, keepdim=True)
        if mask is not None:
            # A row without a valid key (max -inf) gets probabilities 0 and output 0.
            row_max = row_max.nan_to_num_(neginf=0.0)
        probs = s.sub_(row_max).exp_()
        denom = probs.sum(-1, keepdim=True)
        o = torch.matmul(probs, v).div_(denom.clamp_min(torch.finfo(denom.dtype).tiny))
        out6[qi[0], qi[1], :, qi[2]] = o.transpose(1, 2).reshape(r1 - r0, lay.h, lay.w, -1)
        if lse is not None:
            lse[r0:r1] = (row_max + denom.log()).masked_fill_(denom == 0, float("inf"))
    return out, lse


class _RegionAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, region_idx, key_valid, n, m, qk_dim, scale):
        lay = _Layout(qkv, n, m, qk_dim, region_idx.shape[-1])
        out, lse = _forward(lay, qkv, region_idx, key_valid, scale, with_lse=True)
        ctx.save_for_backward(qkv, region_idx, key_valid, out, lse)
        ctx.args = (n, m, qk_dim, scale, key_valid is not None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        qkv, region_idx, key_valid, out, lse = ctx.saved_tensors
        n, m, qk_dim, scale, has_valid = ctx.args
        key_valid = key_valid if has_valid else None
        lay = _Layout(qkv, n, m, qk_dim, region_idx.shape[-1])
        qkv6 = lay.regions(qkv)
        q6, kv6 = qkv6[..., : lay.qk], qkv6[..., lay.qk :]
        go6, out6 = lay.regions(grad_out.contiguous()), lay.regions(out)
        grad = torch.zeros_like(qkv)
        grad6 = lay.regions(grad)
        grad_q6 = grad6[..., : lay.qk]
        # Routed key/value gradients add up over query regions: accumulate them in region
        # order with index_add_ and move them to image order once at the end.
        grad_kv = qkv.new_zeros(lay.rows, lay.tokens, qkv.shape[-1] - lay.qk)
        p2 = n * n
        base = torch.arange(lay.b, device=qkv.device).view(-1, 1, 1) * p2
        flat_idx = (region_idx + base).view(-1, lay.topk)
        for r0, r1 in lay.spans():
            c = r1 - r0
            q, k, v, mask, qi, _ = _gather(lay, q6, kv6, key_valid, region_idx, r0, r1, scale)
            probs = _scores(q, k, mask).sub_(lse[r0:r1]).exp_()
            go = go6[qi[0], qi[1], :, qi[2]].view(c, lay.tokens, m, -1).transpose(1, 2)
            o = out6[qi[0], qi[1], :, qi[2]].view(c, lay.tokens, m, -1).transpose(1, 2)
            delta = (go * o).sum(-1, keepdim=True)
            grad_v = torch.matmul(probs.transpose(-1, -2), go)  # [c, M, T*N, dv]
            grad_s = torch.matmul(go, v.transpose(-1, -2)).sub_(delta).mul_(probs)
            grad_q = torch.matmul(grad_s, k.transpose(-1, -2)).mul_(scale)
            grad_k = torch.matmul(grad_s.transpose(-1, -2), q)  # q is already scaled
            grad_q6[qi[0], qi[1], :, qi[2]] = grad_q.transpose(1, 2).reshape(c, lay.h, lay.w, -1)
            tn = lay.topk * lay.tokens
            grad_kv_c = torch.cat(
                [
                    grad_k.transpose(1, 2).reshape(c, tn, -1),
                    grad_v.transpose(1, 2).reshape(c, tn, -1),
                ],
                dim=-1,
            )
            grad_kv.index_add_(
                0, flat_idx[r0:r1].reshape(-1), grad_kv_c.view(c * lay.topk, lay.tokens, -1)
            )
        grad6[..., lay.qk :] = grad_kv.view(lay.b, n, n, lay.h, lay.w, -1).permute(0, 1, 3, 2, 4, 5)
        return grad, None, None, None, None, None, None


def region_attention(
    qkv: Tensor,
    region_idx: Tensor,
    *,
    n_win: int,
    num_heads: int,
    qk_dim: int,
    scale: float,
    key_valid: Tensor | None = None,
) -> Tensor:
    """BiFormer's fine-level token attention, computed from the joint projection.

    Args:
        qkv: ``[B, Hp, Wp, 2 * qk_dim + dim]`` queries, keys and values in image order, with
            ``Hp`` and ``Wp`` divisible by ``n_win``.
        region_idx: ``[B, P, T]`` routed key regions of each of the ``P = n_win ** 2`` query
            regions (row-major region order).
        n_win: regions per side.
        num_heads: heads ``M``; divides ``qk_dim`` and ``dim``.
        qk_dim: width of queries and keys.
        scale: multiplies ``q . k``.
        key_valid: ``[P, Nk]`` bool over the ``Nk = (Hp / n_win) * (Wp / n_win)`` tokens of
            each region in row-major order; ``False`` keys are never attended (padding).

    Returns:
        ``[B, Hp, Wp, dim]``: for every token, the softmax-weighted values over the tokens of
        its region's routed regions (zeros for a token without a valid key).
    """
    if region_idx.shape[-1] * _DENSE_FACTOR >= n_win * n_win:
        return _masked_dense(qkv, region_idx, n_win, num_heads, qk_dim, scale, key_valid)
    if torch.is_grad_enabled() and qkv.requires_grad:
        return _RegionAttention.apply(qkv, region_idx, key_valid, n_win, num_heads, qk_dim, scale)
    lay = _Layout(qkv, n_win, num_heads, qk_dim, region_idx.shape[-1])
    return _forward(lay, qkv, region_idx, key_valid, scale, with_lse=False)[0]
