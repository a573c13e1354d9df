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

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["QueryProjection", "region_attention"]

# Elements of the per-chunk temporaries (gathered K and V, scores): bounds the extra memory
# of one chunk at 4 * _CHUNK_ELEMS bytes (fp32) whatever the batch size.
_CHUNK_ELEMS = 1 << 19


# Routing to at least 1 / _DENSE_FACTOR of all regions: attend every key under a mask. It
# costs up to _DENSE_FACTOR times the routed multiply-adds but runs as one fused attention call,
# which beats gathering many small regions (BiFormer-T stage 3: 16 of 49 regions of 4 tokens).
_DENSE_FACTOR = 4


def _masked_dense(q, k, v, region_idx, n, m, scale, key_valid):
    """All-pairs attention in image order under an additive ``[B, 1, L, L]`` routing mask;
    same result as the routed computation (masked keys get probability 0)."""
    b, hp, wp, _ = q.shape
    h, w, length = hp // n, wp // n, hp * wp
    routed = torch.zeros(b, n * n, n * n, dtype=torch.bool, device=q.device)
    routed.scatter_(2, region_idx, True)  # [B, P query regions, P key regions]
    rows = torch.arange(hp, device=q.device) // h
    cols = torch.arange(wp, device=q.device) // w
    region_of = (rows[:, None] * n + cols[None, :]).reshape(-1)  # [L] token -> region
    allowed = routed[:, region_of][:, :, region_of]  # [B, L, L]
    empty = None
    if key_valid is not None:
        token_valid = key_valid.view(n, n, h, w).permute(0, 2, 1, 3).reshape(length)
        allowed &= token_valid
        # Query regions whose routed regions hold no valid key: output 0, as routed_attention.
        empty = ~key_valid.any(-1)[region_idx].any(-1)  # [B, P]
        allowed[:, :, 0] |= empty[:, region_of]  # keep SDPA finite; zeroed below
    # An additive float mask: SDPA would otherwise convert the bool one on every call.
    bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
    bias.masked_fill_(~allowed, float("-inf"))

    def heads(t: Tensor) -> Tensor:
        return t.reshape(b, length, m, -1).transpose(1, 2)

    res = F.scaled_dot_product_attention(
        heads(q), heads(k), heads(v), attn_mask=bias[:, None], scale=scale
    )
    res = res.transpose(1, 2).reshape(b, hp, wp, -1)
    if empty is not None:
        res = res.masked_fill(lay_rows(empty, n, h, w)[..., None], 0.0)
    return res


def lay_rows(region_flag: Tensor, n: int, h: int, w: int) -> Tensor:
    """``[B, P]`` per-region flags -> ``[B, n * h, n * w]`` per-token flags."""
    b = region_flag.shape[0]
    flag = region_flag.view(b, n, 1, n, 1).expand(b, n, h, n, w)
    return flag.reshape(b, n * h, n * w)


class QueryProjection(NamedTuple):
    """Queries given as ``F.linear(x, weight, bias)`` of ``x`` ``[B, Hp, Wp, C]``: inference
    then projects only one chunk's queries at a time instead of holding all of them."""

    x: Tensor
    weight: Tensor
    bias: Tensor | None

    def full(self) -> Tensor:
        return F.linear(self.x, self.weight, self.bias)


class _Layout:
    """Sizes of one call: ``n`` regions per side of ``h x w`` tokens, ``m`` heads."""

    def __init__(self, q: Tensor | QueryProjection, v: Tensor, n: int, m: int, topk: int):
        self.b, hp, wp = v.shape[:3]
        self.qk = q.weight.shape[0] if isinstance(q, QueryProjection) else q.shape[-1]
        self.dim = v.shape[-1]
        self.n, self.m, self.topk = n, m, topk
        self.h, self.w = hp // n, wp // n
        self.tokens = self.h * self.w
        self.rows = self.b * n * n  # query regions
        per_row = m * self.tokens * (topk * self.tokens) + topk * self.tokens * (self.qk + self.dim)
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


def _gather(lay: _Layout, q6, k6, v6, key_valid, region_idx, r0, r1, scale):
    """Scaled queries ``[c, M, N, dq]``, routed keys ``[c, M, dq, T*N]``, values
    ``[c, M, T*N, dv]`` and the key mask ``[c, 1, 1, T*N]`` (or ``None``) of one chunk, from
    the ``[B, n, h, n, w, C]`` region views of q, k and v."""
    qi, ki, routed = _index(lay, region_idx, r0, r1)
    c, tn, m = r1 - r0, lay.topk * lay.tokens, lay.m
    if isinstance(q6, QueryProjection):
        q = F.linear(q6.x[qi[0], qi[1], :, qi[2]], q6.weight, q6.bias)
    else:
        q = q6[qi[0], qi[1], :, qi[2]]
    q = q.view(c, lay.tokens, m, -1).transpose(1, 2).mul_(scale)
    k = k6[ki[0], ki[1], :, ki[2]].view(c, tn, m, -1).permute(0, 2, 3, 1)
    v = v6[ki[0], ki[1], :, ki[2]].view(c, tn, m, -1).transpose(1, 2)
    mask = None if key_valid is None else key_valid[routed].view(c, 1, 1, tn)
    return q, k, v, mask, qi


def _scores(q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
    s = torch.matmul(q, k)
    if mask is not None:
        s.masked_fill_(~mask, float("-inf"))
    return s


def _forward(lay: _Layout, q, k, v, region_idx, key_valid, scale, with_lse: bool, out=None):
    """Forward over all chunks. ``out`` (``[B, Hp, Wp, dim]``, optional) receives the result
    added to what it holds; otherwise a new tensor is returned."""
    if isinstance(q, QueryProjection):
        q6 = q._replace(x=lay.regions(q.x))
    else:
        q6 = lay.regions(q)
    k6, v6 = lay.regions(k), lay.regions(v)
    accumulate = out is not None
    if out is None:
        out = v.new_empty(*v.shape[:3], lay.dim)
    out6 = lay.regions(out)
    lse = v.new_empty(lay.rows, lay.m, lay.tokens, 1) if with_lse else None
    for r0, r1 in lay.spans():
        qc, kc, vc, mask, qi = _gather(lay, q6, k6, v6, key_valid, region_idx, r0, r1, scale)
        s = _scores(qc, kc, mask)
        row_max = s.amax(-1, keepdim=True)
        if mask is not None:
            # A row without a valid key (max -inf) gets probabilities 0 and output 0.
            row_max = row_max.nan_to_num_(neginf=0.0)
        probs = s.sub_(row_max).exp_()
        denom = probs.sum(-1, keepdim=True)
        o = torch.matmul(probs, vc).div_(denom.clamp_min(torch.finfo(denom.dtype).tiny))
        o = o.transpose(1, 2).reshape(r1 - r0, lay.h, lay.w, -1)
        if accumulate:
            o += out6[qi[0], qi[1], :, qi[2]]
        out6[qi[0], qi[1], :, qi[2]] = o
        if lse is not None:
            lse[r0:r1] = (row_max + denom.log()).masked_fill_(denom == 0, float("inf"))
    return out, lse


def _split(qkv: Tensor, qk_dim: int):
    return qkv.split([qk_dim, qk_dim, qkv.shape[-1] - 2 * qk_dim], dim=-1)


class _RegionAttention(torch.autograd.Function):
    """Saves q, k, v (views of the projection, no copies), the output and the row
    log-sum-exp; the backward pass recomputes each chunk's scores."""

    @staticmethod
    def forward(ctx, q, k, v, region_idx, key_valid, n, m, scale):
        lay = _Layout(q, v, n, m, region_idx.shape[-1])
        out, lse = _forward(lay, q, k, v, region_idx, key_valid, scale, with_lse=True)
        ctx.save_for_backward(q, k, v, region_idx, key_valid, out, lse)
        ctx.args = (n, m, scale, key_valid is not None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q_all, k_all, v_all, region_idx, key_valid, out, lse = ctx.saved_tensors
        n, m, scale, has_valid = ctx.args
        key_valid = key_valid if has_valid else None
        lay = _Layout(q_all, v_all, n, m, region_idx.shape[-1])
        q6, k6, v6 = lay.regions(q_all), lay.regions(k_all), lay.regions(v_all)
        go6, out6 = lay.regions(grad_out.contiguous()), lay.regions(out)
        grad_q = q_all.new_empty(q_all.shape)
        grad_q6 = lay.regions(grad_q)
        # Routed key/value gradients add up over query regions: accumulate them in region
        # order with index_add_ and move them to image order once at the end.
        grad_k = k_all.new_zeros(lay.rows, lay.tokens, lay.qk)
        grad_v = v_all.new_zeros(lay.rows, lay.tokens, lay.dim)
        base = torch.arange(lay.b, device=q_all.device).view(-1, 1, 1) * (n * n)
        flat_idx = (region_idx + base).view(-1, lay.topk)
        for r0, r1 in lay.spans():
            c = r1 - r0
            q, k, v, mask, qi = _gather(lay, q6, k6, v6, key_valid, region_idx, r0, r1, scale)
            probs = _scores(q, k, mask).sub_(lse[r0:r1]).exp_()
            go = go6[qi[0], qi[1], :, qi[2]].view(c, lay.tokens, m, -1).transpose(1, 2)
            o = out6[qi[0], qi[1], :, qi[2]].view(c, lay.tokens, m, -1).transpose(1, 2)
            delta = (go * o).sum(-1, keepdim=True)
            dv = torch.matmul(probs.transpose(-1, -2), go)  # [c, M, T*N, dv]
            ds = torch.matmul(go, v.transpose(-1, -2)).sub_(delta).mul_(probs)
            dq = torch.matmul(ds, k.transpose(-1, -2)).mul_(scale)
            dk = torch.matmul(ds.transpose(-1, -2), q)  # q is already scaled
            grad_q6[qi[0], qi[1], :, qi[2]] = dq.transpose(1, 2).reshape(c, lay.h, lay.w, -1)
            ids = flat_idx[r0:r1].reshape(-1)
            grad_k.index_add_(0, ids, dk.transpose(1, 2).reshape(c * lay.topk, lay.tokens, -1))
            grad_v.index_add_(0, ids, dv.transpose(1, 2).reshape(c * lay.topk, lay.tokens, -1))
        return (
            grad_q,
            _to_image(lay, grad_k),
            _to_image(lay, grad_v),
            None,
            None,
            None,
            None,
            None,
        )


def _to_image(lay: _Layout, t: Tensor) -> Tensor:
    """Region order ``[B * P, h * w, C]`` -> image order ``[B, Hp, Wp, C]`` (one copy)."""
    t = t.view(lay.b, lay.n, lay.n, lay.h, lay.w, -1).permute(0, 1, 3, 2, 4, 5)
    return t.reshape(lay.b, lay.n * lay.h, lay.n * lay.w, -1)


def region_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    region_idx: Tensor,
    *,
    n_win: int,
    num_heads: int,
    scale: float,
    key_valid: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """BiFormer's fine-level token attention on image-order queries, keys and values.

    Args:
        q: queries ``[B, Hp, Wp, qk_dim]``, ``Hp`` and ``Wp`` divisible by ``n_win`` (any
            strides: views of the joint projection are read in place), or a
            :class:`QueryProjection` (inference without autograd only).
        k: keys ``[B, Hp, Wp, qk_dim]``.
        v: values ``[B, Hp, Wp, dim]``.
        region_idx: ``[B, P, T]`` routed key regions of each of the ``P = n_win ** 2`` query
            regions (row-major region order).
        n_win: regions per side.
        num_heads: heads ``M``; divides ``qk_dim`` and ``dim``.
        scale: multiplies ``q . k``.
        key_valid: ``[P, Nk]`` bool over the ``Nk = (Hp / n_win) * (Wp / n_win)`` tokens of
            each region in row-major order; ``False`` keys are never attended (padding).
        out: optional ``[B, Hp, Wp, dim]`` tensor the result is added to in place (inference
            without autograd only); it is returned.

    Returns:
        ``[B, Hp, Wp, dim]``: for every token, the softmax-weighted values over the tokens of
        its region's routed regions (zeros for a token without a valid key).
    """
    projected = isinstance(q, QueryProjection)
    tensors = (*q, k, v) if projected else (q, k, v)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if (out is not None or projected) and needs_grad:
        raise ValueError("out= and QueryProjection are for inference without autograd")
    if region_idx.shape[-1] * _DENSE_FACTOR >= n_win * n_win:
        if projected:
            q = q.full()
        res = _masked_dense(q, k, v, region_idx, n_win, num_heads, scale, key_valid)
        return res if out is None else out.add_(res)
    if needs_grad:
        return _RegionAttention.apply(q, k, v, region_idx, key_valid, n_win, num_heads, scale)
    lay = _Layout(q, v, n_win, num_heads, region_idx.shape[-1])
    return _forward(lay, q, k, v, region_idx, key_valid, scale, with_lse=False, out=out)[0]
