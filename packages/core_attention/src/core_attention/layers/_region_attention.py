"""Region-chunked fine level of Bi-Level Routing Attention (BiFormer, Zhu et al., CVPR 2023).

The fine level of BiFormer lets the tokens of query region ``p`` attend the tokens of the
``T`` key regions ``region_idx[b, p]``. The official code gathers the routed keys and values
of every query region at once (a ``T``-fold copy of K and V) and keeps it for the backward
pass. Three routines here compute the same result (one softmax over all ``T * Nk`` routed
keys per query):

* :func:`region_attention` on image-order ``q, k, v`` ``[B, Hp, Wp, C]`` (views of the joint
  projection are read in place): query regions in chunks, only one chunk's routed keys and
  values gathered at a time, the output written back in image order; the backward pass
  recomputes each chunk's scores and output from q, k, v and the saved log-sum-exp.
* the masked all-pairs attention it switches to when the routing covers at least
  ``1 / _DENSE_FACTOR`` of the regions and regions are small (one fused SDPA call under an
  additive mask).
* :func:`region_rows_attention` for eager inference: keys and values in region order,
  queries projected per chunk of region rows, output added through a view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["region_attention", "region_rows_attention", "use_dense"]

# Elements of the per-chunk temporaries (gathered K and V, scores): bounds the extra memory
# of one chunk at 4 * _CHUNK_ELEMS bytes (fp32) whatever the batch size.
_CHUNK_ELEMS = 1 << 18


# Routing to at least 1 / _DENSE_FACTOR of all regions: attend every key under a mask. It
# costs up to _DENSE_FACTOR times the routed multiply-adds but runs as one fused attention call,
# which beats gathering many small regions (BiFormer-T stage 3: 16 of 49 regions of 4 tokens).
_DENSE_FACTOR = 4
# ... and only for regions of at most this many tokens: the products of larger regions are
# efficient as they are, and the mask grows with the square of the map.
_DENSE_MAX_REGION_TOKENS = 16


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


class _Layout:
    """Sizes of one call: ``n`` regions per side of ``h x w`` tokens, ``m`` heads."""

    def __init__(self, q: Tensor, v: Tensor, n: int, m: int, topk: int):
        self.b, hp, wp, self.qk = q.shape
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
        if self.chunk == self.rows:  # also keeps a symbolic size out of range()
            yield 0, self.rows
            return
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
    q = q6[qi[0], qi[1], :, qi[2]].view(c, lay.tokens, m, -1).transpose(1, 2).mul_(scale)
    k = k6[ki[0], ki[1], :, ki[2]].view(c, tn, m, -1).permute(0, 2, 3, 1)
    v = v6[ki[0], ki[1], :, ki[2]].view(c, tn, m, -1).transpose(1, 2)
    mask = None if key_valid is None else key_valid[routed].view(c, 1, 1, tn)
    return q, k, v, mask, qi


def _scores(q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
    s = torch.matmul(q, k)
    if mask is not None:
        s.masked_fill_(~mask, float("-inf"))
    return s


def _forward(lay: _Layout, q, k, v, region_idx, key_valid, scale, with_lse: bool):
    q6, k6, v6 = lay.regions(q), lay.regions(k), lay.regions(v)
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
        out6[qi[0], qi[1], :, qi[2]] = o.transpose(1, 2).reshape(r1 - r0, lay.h, lay.w, -1)
        if lse is not None:
            lse[r0:r1] = (row_max + denom.log()).masked_fill_(denom == 0, float("inf"))
    return out, lse


def _split(qkv: Tensor, qk_dim: int):
    return qkv.split([qk_dim, qk_dim, qkv.shape[-1] - 2 * qk_dim], dim=-1)


class _RegionAttention(torch.autograd.Function):
    """Saves q, k, v (views of the projection, no copies) and the row log-sum-exp; the
    backward pass recomputes each chunk's scores and output (not storing the output keeps
    one activation-sized tensor per layer out of the training footprint)."""

    @staticmethod
    def forward(ctx, q, k, v, region_idx, key_valid, n, m, scale):
        lay = _Layout(q, v, n, m, region_idx.shape[-1])
        out, lse = _forward(lay, q, k, v, region_idx, key_valid, scale, with_lse=True)
        ctx.save_for_backward(q, k, v, region_idx, key_valid, lse)
        ctx.args = (n, m, scale, key_valid is not None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q_all, k_all, v_all, region_idx, key_valid, lse = ctx.saved_tensors
        n, m, scale, has_valid = ctx.args
        key_valid = key_valid if has_valid else None
        lay = _Layout(q_all, v_all, n, m, region_idx.shape[-1])
        q6, k6, v6 = lay.regions(q_all), lay.regions(k_all), lay.regions(v_all)
        go6 = lay.regions(grad_out.contiguous())
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
            delta = (go * torch.matmul(probs, v)).sum(-1, keepdim=True)  # rowsum(dO * O)
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
) -> Tensor:
    """BiFormer's fine-level token attention on image-order queries, keys and values.

    Args:
        q: queries ``[B, Hp, Wp, qk_dim]``, ``Hp`` and ``Wp`` divisible by ``n_win`` (any
            strides: views of the joint projection are read in place).
        k: keys ``[B, Hp, Wp, qk_dim]``.
        v: values ``[B, Hp, Wp, dim]``.
        region_idx: ``[B, P, T]`` routed key regions of each of the ``P = n_win ** 2`` query
            regions (row-major region order).
        n_win: regions per side.
        num_heads: heads ``M``; divides ``qk_dim`` and ``dim``.
        scale: multiplies ``q . k``.
        key_valid: ``[P, Nk]`` bool over the ``Nk = (Hp / n_win) * (Wp / n_win)`` tokens of
            each region in row-major order; ``False`` keys are never attended (padding).

    Returns:
        ``[B, Hp, Wp, dim]``: for every token, the softmax-weighted values over the tokens of
        its region's routed regions (zeros for a token without a valid key).
    """
    tokens = (q.shape[1] // n_win) * (q.shape[2] // n_win)
    if use_dense(region_idx.shape[-1], n_win, tokens):
        return _masked_dense(q, k, v, region_idx, n_win, num_heads, scale, key_valid)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _RegionAttention.apply(q, k, v, region_idx, key_valid, n_win, num_heads, scale)
    lay = _Layout(q, v, n_win, num_heads, region_idx.shape[-1])
    return _forward(lay, q, k, v, region_idx, key_valid, scale, with_lse=False)[0]


def use_dense(topk: int, n_win: int, region_tokens: int) -> bool:
    """Whether :func:`region_attention` runs the masked all-pairs attention."""
    return topk * _DENSE_FACTOR >= n_win * n_win and region_tokens <= _DENSE_MAX_REGION_TOKENS


def region_rows_attention(
    x: Tensor,
    q_weight: Tensor,
    q_bias: Tensor | None,
    k: Tensor,
    v: Tensor,
    region_idx: Tensor,
    out: Tensor,
    *,
    n_win: int,
    scale: float,
) -> Tensor:
    """Inference-only fine level that never holds all queries: adds to ``out`` the attention
    of every token of ``x`` over the tokens of its routed regions.

    Queries are projected from ``x`` one chunk of region rows at a time; keys and values come
    in region order, so routed regions are gathered with ``index_select`` of whole regions,
    and each chunk's output is added to ``out`` through a view.

    Args:
        x: ``[B, H, W, C]`` input of the projections, ``H`` and ``W`` divisible by ``n_win``.
        q_weight, q_bias: the query projection (``F.linear``) to ``qk_dim`` channels.
        k: keys in region order, heads first: ``[B * P, M, h * w, qk_dim / M]`` (regions and
            the tokens of a region row-major).
        v: values ``[B * P, M, h * w, dim / M]``, same order.
        region_idx: ``[B, P, T]`` routed key regions.
        out: ``[B, H, W, dim]`` contiguous; the result is added to it in place and returned.
        n_win: regions per side; scale: multiplies ``q . k``.
    """
    b, hgt, wid, c = x.shape
    n, m, topk = n_win, k.shape[1], region_idx.shape[-1]
    h, w = hgt // n, wid // n
    tokens, dim = h * w, out.shape[-1]
    per_region = m * tokens * topk * tokens + topk * tokens * (k.shape[1] * k.shape[-1] + dim)
    # Region rows (of n regions) per chunk; two at least: fewer, larger matrix products.
    band_rows = max(2, _CHUNK_ELEMS // (per_region * n))
    x_rows = x.reshape(b * n, h, n, w, c)
    out_rows = out.view(b * n, h, n, w, dim)
    flat_idx = (region_idx + torch.arange(b, device=x.device).view(-1, 1, 1) * (n * n)).view(-1)
    for r0 in range(0, b * n, band_rows):
        r1 = min(r0 + band_rows, b * n)
        regions = (r1 - r0) * n
        # Region rows are contiguous in image order: project them in place, then one copy
        # to [regions, M, N, dq].
        q = F.linear(x_rows[r0:r1], q_weight, q_bias).view(r1 - r0, h, n, w, m, -1)
        q = q.permute(0, 2, 4, 1, 3, 5).reshape(regions, m, tokens, -1)
        ids = flat_idx[r0 * n * topk : r1 * n * topk]
        kc, vc = k.index_select(0, ids), v.index_select(0, ids)  # [c * T, M, N, d]
        if topk > 1:
            kc = kc.view(regions, topk, m, tokens, -1).transpose(1, 2)
            vc = vc.view(regions, topk, m, tokens, -1).transpose(1, 2)
        kc = kc.reshape(regions, m, topk * tokens, -1)
        vc = vc.reshape(regions, m, topk * tokens, -1)
        s = torch.matmul(q.mul_(scale), kc.transpose(-1, -2))  # [c, M, N, T * N]
        probs = s.sub_(s.amax(-1, keepdim=True)).exp_()
        o = torch.matmul(probs, vc).div_(probs.sum(-1, keepdim=True))  # [c, M, N, dv]
        o = o.view(r1 - r0, n, m, h, w, -1).permute(0, 3, 1, 4, 2, 5)  # [c, h, n, w, M, dv]
        out_rows[r0:r1].view(o.shape).add_(o)
    return out
