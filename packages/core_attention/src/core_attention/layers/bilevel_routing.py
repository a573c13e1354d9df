"""Bi-Level Routing Attention from BiFormer (Zhu et al., "BiFormer: Vision Transformer with
Bi-Level Routing Attention", CVPR 2023).

The image is cut into ``n_win x n_win`` regions. A coarse level routes every query region to
the ``topk`` key regions whose mean key best matches its mean query; a fine level runs token
attention from each query region to the tokens of its routed regions only.

:func:`routed_attention` computes the fine level without copying the routed keys and values
``topk`` times (the ``torch.gather`` of the reference implementation): it visits the routed
regions one at a time and merges them with an online softmax, and its backward pass
recomputes each region's scores instead of storing them, so memory does not grow with
``topk``.

:class:`BiLevelRoutingAttention` with BiFormer's own settings (unpooled keys, hard routing)
runs the fine level through :mod:`core_attention.layers._region_attention` instead: chunks
of query regions read straight from the projection (no region-order copies kept for the
backward pass, which recomputes scores and outputs from the saved log-sum-exp), a masked
all-pairs attention when the routing covers at least a quarter of the regions, and in eager
inference a band pass that never holds all queries (see :meth:`_lean_forward`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from core_attention import backends
from core_attention.functional import attention
from core_attention.layers._region_attention import (
    region_attention,
    region_rows_attention,
    use_dense,
)

__all__ = ["BiLevelRoutingAttention", "QKVLinear", "TopkRouting", "routed_attention"]

_KV_DOWNSAMPLE_MODES = ("identity", "avgpool", "maxpool", "ada_avgpool", "ada_maxpool")


# --------------------------------------------------------------------------------------------
# Region-routed token attention
# --------------------------------------------------------------------------------------------


def _step_scores(q, k_flat, ids, shape, weight_t, key_valid_t):
    """Scores of every query region against its ``t``-th routed key region.

    Returns the raw scaled logits ``a`` (before routing weights and masking) and the logits
    ``s`` used by the softmax (``weight_t * a`` with masked keys at ``-inf``).
    """
    kt = k_flat.index_select(0, ids).view(shape)
    a = torch.matmul(q, kt.transpose(-1, -2))
    s = a if weight_t is None else a * weight_t
    if key_valid_t is not None:
        s = s.masked_fill(~key_valid_t, float("-inf"))
    return kt, a, s


def _prepare(q, k, v, region_idx):
    b, m = q.shape[0], q.shape[2]
    pk, nk = k.shape[1], k.shape[3]
    base = torch.arange(b, device=q.device).view(b, 1, 1) * pk
    flat_idx = region_idx + base  # [B, P, T] rows of the flattened [B * Pk, ...] key tensor
    k_flat = k.reshape(b * pk, m, nk, k.shape[-1])
    v_flat = v.reshape(b * pk, m, nk, v.shape[-1])
    return flat_idx, k_flat, v_flat


def _step_weight(region_weight, t, b, p):
    if region_weight is None:
        return None
    return region_weight[:, :, t].view(b, p, 1, 1, 1)


def _step_valid(key_valid, region_idx, t, b, p):
    if key_valid is None:
        return None
    return key_valid[region_idx[:, :, t]].view(b, p, 1, 1, -1)


def _routed_forward(q, k, v, region_idx, region_weight, key_valid):
    """Online-softmax forward. Returns the output and the row log-sum-exp ``[B,P,M,Nq,1]``."""
    b, p, m = q.shape[:3]
    nk, dq, dv = k.shape[3], k.shape[4], v.shape[4]
    flat_idx, k_flat, v_flat = _prepare(q, k, v, region_idx)
    row_max = denom = acc = None
    for t in range(region_idx.shape[-1]):
        ids = flat_idx[:, :, t].reshape(-1)
        w_t = _step_weight(region_weight, t, b, p)
        _, _, s = _step_scores(
            q, k_flat, ids, (b, p, m, nk, dq), w_t, _step_valid(key_valid, region_idx, t, b, p)
        )
        s_max = s.amax(-1, keepdim=True)
        new_max = s_max if row_max is None else torch.maximum(row_max, s_max)
        # A row whose keys are all masked so far has max -inf; shift by 0 there (exp -> 0).
        shift = new_max if key_valid is None else new_max.nan_to_num(neginf=0.0)
        # No autograd runs here: update the buffers in place.
        probs = s.sub_(shift).exp_()
        vt = v_flat.index_select(0, ids).view(b, p, m, nk, dv)
        pv = torch.matmul(probs, vt)
        if w_t is not None:
            pv.mul_(w_t)
        if row_max is None:
            denom = probs.sum(-1, keepdim=True)
            acc = pv
        else:
            alpha = (row_max - shift).exp_()
            denom.mul_(alpha).add_(probs.sum(-1, keepdim=True))
            acc.mul_(alpha).add_(pv)
        row_max = new_max
    empty = denom == 0
    denom = denom.masked_fill(empty, 1.0)
    lse = (row_max.nan_to_num(neginf=0.0) + denom.log()).masked_fill(empty, float("inf"))
    return acc.div_(denom), lse


class _RoutedAttention(torch.autograd.Function):
    """Routed attention with a backward that recomputes each routed region's scores."""

    @staticmethod
    def forward(ctx, q, k, v, region_idx, region_weight, key_valid):
        out, lse = _routed_forward(q, k, v, region_idx, region_weight, key_valid)
        ctx.save_for_backward(q, k, v, region_idx, region_weight, key_valid, out, lse)
        ctx.has_weight = region_weight is not None
        ctx.has_valid = key_valid is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, region_idx, region_weight, key_valid, out, lse = ctx.saved_tensors
        if not ctx.has_weight:
            region_weight = None
        if not ctx.has_valid:
            key_valid = None
        b, p, m, nq, dq = q.shape
        nk, dv = k.shape[3], v.shape[4]
        flat_idx, k_flat, v_flat = _prepare(q, k, v, region_idx)
        grad_out = grad_out.contiguous()
        delta = (grad_out * out).sum(-1, keepdim=True)  # [B, P, M, Nq, 1]
        grad_q = torch.zeros_like(q)
        grad_k = torch.zeros_like(k_flat)
        grad_v = torch.zeros_like(v_flat)
        grad_w = None if region_weight is None else torch.zeros_like(region_weight)
        for t in range(region_idx.shape[-1]):
            ids = flat_idx[:, :, t].reshape(-1)
            w_t = _step_weight(region_weight, t, b, p)
            kt, a, s = _step_scores(
                q, k_flat, ids, (b, p, m, nk, dq), w_t, _step_valid(key_valid, region_idx, t, b, p)
            )
            # Backward builds no graph (once_differentiable): work in place on fresh buffers.
            probs = s.sub_(lse).exp_()
            vt = v_flat.index_select(0, ids).view(b, p, m, nk, dv)
            grad_v_eff = torch.matmul(probs.transpose(-1, -2), grad_out)  # d(w_t * vt)
            grad_p = torch.matmul(grad_out, vt.transpose(-1, -2))
            if w_t is not None:
                grad_p.mul_(w_t)
            grad_s = grad_p.sub_(delta).mul_(probs)
            if w_t is None:
                grad_a, grad_vt = grad_s, grad_v_eff
            else:
                grad_w[:, :, t] = (grad_v_eff * vt).sum((2, 3, 4)) + (grad_s * a).sum((2, 3, 4))
                grad_a, grad_vt = grad_s.mul_(w_t), grad_v_eff.mul_(w_t)
            grad_q.view(-1, nq, dq).baddbmm_(grad_a.view(-1, nq, nk), kt.view(-1, nk, dq))
            grad_kt = torch.matmul(grad_a.transpose(-1, -2), q)
            grad_k.index_add_(0, ids, grad_kt.view(b * p, m, nk, dq))
            grad_v.index_add_(0, ids, grad_vt.view(b * p, m, nk, dv))
        return (
            grad_q,
            grad_k.view(k.shape),
            grad_v.view(v.shape),
            None,
            grad_w,
            None,
        )


def _single_region_attention(q, k, v, region_idx, scale, region_weight, key_valid, backend):
    """``T == 1``: one region per query region, a plain attention call on the gathered one."""
    b, p, m, nq, dq = q.shape
    flat_idx, k_flat, v_flat = _prepare(q, k, v, region_idx)
    ids = flat_idx.reshape(-1)
    kt, vt = k_flat.index_select(0, ids), v_flat.index_select(0, ids)  # [B * P, M, Nk, d]
    if region_weight is not None:
        w = region_weight.reshape(b * p, 1, 1, 1)
        kt, vt = kt * w, vt * w
    mask = None
    if key_valid is not None:
        mask = key_valid[region_idx.reshape(-1)].view(b * p, 1, 1, -1)
    out = attention(
        q.reshape(b * p, m, nq, dq), kt, vt, attn_mask=mask, scale=scale, backend=backend
    )
    return out.view(b, p, m, nq, -1)


def routed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    region_idx: Tensor,
    *,
    scale: float,
    region_weight: Tensor | None = None,
    key_valid: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Token attention from each query region to the key regions it is routed to.

    Query region ``i`` attends the tokens of key regions ``region_idx[:, i, :]`` with one
    softmax over all of them, as BiFormer's fine level. The routed keys and values are never
    gathered into one ``topk``-fold copy: with one routed region (``T == 1``) the call is a
    plain :func:`core_attention.attention` on that region; with several, the regions are
    visited one at a time and merged by an online softmax (a PyTorch routine; its backward
    recomputes each region's scores).

    Args:
        q: queries ``[B, P, M, Nq, D]`` (``P`` query regions, ``M`` heads, ``Nq`` tokens each).
        k: keys ``[B, Pk, M, Nk, D]`` (``Pk`` key regions of ``Nk`` tokens).
        v: values ``[B, Pk, M, Nk, Dv]``.
        region_idx: ``[B, P, T]`` integer indices into the ``Pk`` key regions.
        scale: multiplies the dot products ``q . k``.
        region_weight: ``[B, P, T]`` soft routing weights; routed region ``t`` then
            contributes keys and values multiplied by ``region_weight[..., t]`` (BiFormer's
            ``soft_routing``). Differentiable.
        key_valid: ``[Pk, Nk]`` bool, ``False`` for keys no query may attend (padding).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``; only ``T == 1`` can run a Triton
            kernel (through :func:`core_attention.attention`), ``"triton"`` raises otherwise.

    Returns:
        ``[B, P, M, Nq, Dv]``. A query row with no valid key returns zeros.
    """
    if q.dim() != 5 or k.dim() != 5 or v.dim() != 5:
        raise ValueError(
            f"q, k, v must be [B, P, M, N, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if region_idx.dim() != 3 or region_idx.shape[:2] != q.shape[:2]:
        raise ValueError(f"region_idx must be [B, P, T], got {tuple(region_idx.shape)}")
    if region_idx.shape[-1] == 1:
        return _single_region_attention(
            q, k, v, region_idx, scale, region_weight, key_valid, backend
        )
    backends.resolve(backend, "routed attention over several regions has no Triton kernel")
    q = q * scale
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, region_weight)
    )
    if needs_grad:
        return _RoutedAttention.apply(q, k, v, region_idx, region_weight, key_valid)
    return _routed_forward(q, k, v, region_idx, region_weight, key_valid)[0]


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


def _region_mean(t: Tensor, rows: int, n: int) -> Tensor:
    """Means of the ``rows x n`` regions of ``t`` ``[B, H, W, C]`` (``H`` divisible by
    ``rows``, ``W`` by ``n``) -> ``[B, rows * n, C]``, regions in row-major order.

    Summed one axis at a time over contiguous inner blocks: on CPU much faster than one
    reduction over two strided axes of small regions."""
    b, hgt, wid, c = t.shape
    hh, ww = hgt // rows, wid // n
    s = t.reshape(b, rows, hh, wid * c).sum(2).view(b, rows, n, ww, c).sum(3)
    return s.div_(hh * ww).view(b, rows * n, c)


class QKVLinear(nn.Module):
    """Joint projection ``x -> (q, k, v)`` with widths ``(qk_dim, qk_dim, dim)``.

    The single ``qkv`` linear layer keeps BiFormer's parameter names (``qkv.qkv``).
    """

    def __init__(self, dim: int, qk_dim: int, bias: bool = True):
        super().__init__()
        self.dim = dim
        self.qk_dim = qk_dim
        self.qkv = nn.Linear(dim, qk_dim + qk_dim + dim, bias=bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.qkv(x).split([self.qk_dim, self.qk_dim, self.dim], dim=-1)


class TopkRouting(nn.Module):
    """Region-level routing: top-k key regions per query region by mean-feature affinity.

    Args:
        qk_dim: width of the region descriptors.
        topk: regions kept per query region.
        qk_scale: multiplies the affinity logits (default ``qk_dim ** -0.5``).
        param_routing: pass descriptors through a learnt linear ``emb`` first.
        diff_routing: let gradients flow into the descriptors (else they are detached).
    """

    def __init__(
        self,
        qk_dim: int,
        topk: int = 4,
        qk_scale: float | None = None,
        param_routing: bool = False,
        diff_routing: bool = False,
    ):
        super().__init__()
        self.topk = topk
        self.qk_dim = qk_dim
        self.scale = qk_scale or qk_dim**-0.5
        self.diff_routing = diff_routing
        self.emb = nn.Linear(qk_dim, qk_dim) if param_routing else nn.Identity()

    def forward(
        self, query: Tensor, key: Tensor, region_valid: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``query``, ``key``: ``[B, P, qk_dim]`` region descriptors; ``region_valid``:
        optional ``[P]`` bool, regions that may be routed to.

        Returns the softmax routing weights and the region indices, both ``[B, P, topk]``.
        """
        if not self.diff_routing:
            query, key = query.detach(), key.detach()
        query_hat, key_hat = self.emb(query), self.emb(key)
        logits = (query_hat * self.scale) @ key_hat.transpose(-2, -1)  # [B, P, P]
        if region_valid is not None:
            logits = logits.masked_fill(~region_valid, float("-inf"))
        top_logits, top_idx = torch.topk(logits, k=self.topk, dim=-1)
        return top_logits.softmax(dim=-1), top_idx


class BiLevelRoutingAttention(nn.Module):
    """Bi-Level Routing Attention (BiFormer, Zhu et al., CVPR 2023) on NHWC feature maps.

    Input and output are ``[B, H, W, C]`` with ``C == dim``. The map is cut into
    ``n_win x n_win`` regions of ``(H / n_win) x (W / n_win)`` tokens. For every region the
    mean query and mean key route it to ``topk`` regions (:class:`TopkRouting`); each token
    then attends, with ``num_heads`` heads and scale ``qk_scale or qk_dim ** -0.5``, to all
    tokens of its routed regions (keys optionally pooled per region by
    ``kv_downsample_mode``). A depthwise ``side_dwconv`` convolution of the values (LePE) is
    added and ``wo`` projects the result.

    Constructor arguments, parameter names and shapes follow the official
    ``ops/bra_legacy.py`` (``qkv.qkv``, ``wo``, ``lepe``, ``router.emb``), so its state dicts
    load with ``strict=True`` and, on sizes divisible by ``n_win``, the outputs are the
    official ones. The official ``topk=-1`` / ``-2`` of BiFormer's model configs select a
    different block (full attention), not this module, and are rejected here.

    Differences from the official module:

    * Memory: the routed keys and values are never gathered into a ``topk``-fold copy for
      the whole map (see :func:`routed_attention` and
      :func:`~core_attention.layers._region_attention.region_attention`); the training
      footprint holds the projection, LePE and output-projection inputs and a row
      log-sum-exp, and eager inference holds keys and values but not the queries.
    * ``auto_pad=True`` on sizes not divisible by ``n_win``: the official module zero-pads
      the input and lets the padded tokens take part everywhere (their projections equal the
      ``qkv`` bias). Here padded tokens are left out of the region means used for routing,
      are never keys in the attention (a region made only of padding is never routed to;
      pooled keys average or max over real tokens only) and are outside the LePE
      convolution, which sees the zero padding of a convolution at the image border. The
      content of the padding therefore has no effect on the output.
    * ``diff_routing=True`` with ``soft_routing=False`` ("hard" differentiable routing,
      unimplemented upstream) raises at construction rather than in ``forward``.
    * ``forward`` returns only the output (no ``ret_attn_mask``).

    Args:
        dim: channels ``C`` of input, values and output.
        num_heads: attention heads; divides ``dim`` and ``qk_dim``.
        n_win: regions per side.
        qk_dim: width of queries and keys (default ``dim``).
        qk_scale: attention and routing scale (default ``qk_dim ** -0.5``, as upstream: the
            full ``qk_dim``, not the head width).
        kv_per_win: pooled keys per region side for ``"ada_avgpool"`` / ``"ada_maxpool"``.
        kv_downsample_ratio: pooling window for ``"avgpool"`` / ``"maxpool"``.
        kv_downsample_kernel: accepted for signature compatibility, unused (as upstream).
        kv_downsample_mode: ``"identity"`` (BiFormer's models), ``"avgpool"``, ``"maxpool"``,
            ``"ada_avgpool"`` or ``"ada_maxpool"``.
        topk: routed regions per query region, ``1 <= topk <= n_win ** 2``.
        param_attention: ``"qkvo"`` (output projection ``wo``) or ``"qkv"`` (none).
        param_routing: learnt linear ``router.emb`` on the region descriptors (needs
            ``diff_routing``).
        diff_routing: back-propagate through the routing descriptors.
        soft_routing: scale each routed region's keys and values by its routing weight.
        side_dwconv: LePE depthwise kernel size; ``0`` disables it.
        auto_pad: pad sizes not divisible by ``n_win`` (else they raise ``ValueError``).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :func:`routed_attention`:
            only ``topk=1`` has a Triton path).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        n_win: int = 7,
        qk_dim: int | None = None,
        qk_scale: float | None = None,
        kv_per_win: int = 4,
        kv_downsample_ratio: int = 4,
        kv_downsample_kernel: int | None = None,
        kv_downsample_mode: str = "identity",
        topk: int = 4,
        param_attention: str = "qkvo",
        param_routing: bool = False,
        diff_routing: bool = False,
        soft_routing: bool = False,
        side_dwconv: int = 3,
        auto_pad: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        self.dim = dim
        self.n_win = n_win
        self.num_heads = num_heads
        self.qk_dim = qk_dim or dim
        if self.qk_dim % num_heads or dim % num_heads:
            raise ValueError(
                f"qk_dim ({self.qk_dim}) and dim ({dim}) must be divisible by num_heads "
                f"({num_heads})"
            )
        if not 1 <= topk <= n_win * n_win:
            raise ValueError(
                f"topk must be in [1, n_win**2 = {n_win * n_win}], got {topk} (BiFormer's "
                "topk=-1/-2 mean a full-attention block instead of this module)"
            )
        if param_routing and not diff_routing:
            raise ValueError("param_routing=True needs diff_routing=True")
        if diff_routing and not soft_routing:
            raise ValueError(
                "diff_routing=True needs soft_routing=True: hard differentiable routing is "
                "not defined by BiFormer"
            )
        if kv_downsample_mode not in _KV_DOWNSAMPLE_MODES:
            raise ValueError(
                f"kv_downsample_mode must be one of {_KV_DOWNSAMPLE_MODES}, "
                f"got {kv_downsample_mode!r}"
            )
        if param_attention not in ("qkvo", "qkv"):
            raise ValueError(f"param_attention must be 'qkvo' or 'qkv', got {param_attention!r}")
        self.scale = qk_scale or self.qk_dim**-0.5
        self.topk = topk
        self.param_routing = param_routing
        self.diff_routing = diff_routing
        self.soft_routing = soft_routing
        self.param_attention = param_attention
        self.kv_downsample_mode = kv_downsample_mode
        self.kv_per_win = kv_per_win
        self.kv_downsample_ratio = kv_downsample_ratio
        self.kv_downsample_kernel = kv_downsample_kernel
        self.auto_pad = auto_pad
        if backend not in backends.BACKENDS:
            raise ValueError(f"backend must be one of {backends.BACKENDS}, got {backend!r}")
        self.backend = backend

        self.lepe = (
            nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
            if side_dwconv > 0
            else None
        )
        self.router = TopkRouting(
            qk_dim=self.qk_dim,
            topk=topk,
            qk_scale=self.scale,
            param_routing=param_routing,
            diff_routing=diff_routing,
        )
        self.qkv = QKVLinear(dim, self.qk_dim)
        self.wo = nn.Linear(dim, dim) if param_attention == "qkvo" else nn.Identity()
        self.kv_down = self._make_kv_down()

    def _make_kv_down(self) -> nn.Module:
        mode, r = self.kv_downsample_mode, self.kv_downsample_ratio
        if mode == "ada_avgpool":
            return nn.AdaptiveAvgPool2d(self.kv_per_win)
        if mode == "ada_maxpool":
            return nn.AdaptiveMaxPool2d(self.kv_per_win)
        if mode == "avgpool" and r > 1:
            return nn.AvgPool2d(r)
        if mode == "maxpool" and r > 1:
            return nn.MaxPool2d(r)
        return nn.Identity()

    def _to_regions(self, t: Tensor, h: int, w: int) -> Tensor:
        """``[B, H, W, M * d]`` -> ``[B, P, M, h * w, d]`` (one copy)."""
        b, n, m = t.shape[0], self.n_win, self.num_heads
        t = t.reshape(b, n, h, n, w, m, t.shape[-1] // m)
        return t.permute(0, 1, 3, 5, 2, 4, 6).reshape(b, n * n, m, h * w, -1)

    def _region_means(self, q: Tensor, k: Tensor, valid: Tensor | None, h: int, w: int):
        """Mean query and key of every region, ``[B, P, qk_dim]``, over real tokens only."""
        b, n = q.shape[0], self.n_win

        def mean(t: Tensor) -> Tensor:
            if valid is None:
                return _region_mean(t, n, n)
            t = t.reshape(b, n, h, n, w, t.shape[-1])
            mask = valid.view(1, n, h, n, w, 1).to(t.dtype)
            count = mask.sum((2, 4)).clamp_min(1.0)
            return ((t * mask).sum((2, 4)) / count).reshape(b, n * n, -1)

        return mean(q), mean(k)

    def _pooled_keys(self, k: Tensor, v: Tensor, valid: Tensor | None, h: int, w: int):
        """Keys and values per region, pooled by ``kv_down``, as ``[B, P, M, Nk, d]``, and
        the ``[P, Nk]`` validity of the pooled keys (``None`` when all are valid)."""
        b, n, c = k.shape[0], self.n_win, k.shape[-1] + v.shape[-1]
        if isinstance(self.kv_down, nn.Identity):
            key_valid = None
            if valid is not None:
                key_valid = valid.view(n, h, n, w).permute(0, 2, 1, 3).reshape(n * n, h * w)
            return self._to_regions(k, h, w), self._to_regions(v, h, w), key_valid
        kv = torch.cat([k, v], dim=-1).reshape(b, n, h, n, w, c)
        kv = kv.permute(0, 1, 3, 5, 2, 4).reshape(b * n * n, c, h, w)
        if valid is None:
            pooled, key_valid = self.kv_down(kv), None
        else:
            mask = valid.view(n, h, n, w).permute(0, 2, 1, 3).reshape(n * n, 1, h, w)
            mask = mask.repeat(b, 1, 1, 1)
            # Pool over real tokens only; a pooled cell without one is not a key.
            if self.kv_downsample_mode.endswith("avgpool"):
                fraction = self.kv_down(mask.to(kv.dtype))
                pooled = self.kv_down(kv * mask) / fraction.clamp_min(1e-12)
                cell_valid = fraction > 0
            else:
                pooled = self.kv_down(kv.masked_fill(~mask, float("-inf")))
                cell_valid = self.kv_down(mask.to(kv.dtype)) > 0
            pooled = pooled.masked_fill(~cell_valid, 0.0)
            key_valid = cell_valid[: n * n].reshape(n * n, -1)
        hk, wk = pooled.shape[-2:]
        m = self.num_heads
        pooled = pooled.reshape(b, n * n, c, hk * wk).transpose(-1, -2)
        k_pix, v_pix = pooled.split([self.qk_dim, self.dim], dim=-1)

        def heads(t: Tensor) -> Tensor:
            return t.reshape(b, n * n, hk * wk, m, -1).transpose(2, 3)

        return heads(k_pix), heads(v_pix), key_valid

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[B, H, W, dim]`` -> ``[B, H, W, dim]``."""
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"expected NHWC input [B, H, W, {self.dim}], got {tuple(x.shape)}")
        b, h_in, w_in, _ = x.shape
        n = self.n_win
        chunked = self._region_chunked(x)
        eager_no_grad = not (torch.is_grad_enabled() or torch.compiler.is_compiling())
        pad_b, pad_r = (-h_in) % n, (-w_in) % n
        if chunked and eager_no_grad and self._lean_fits(h_in, w_in):
            return self._lean_forward(x)
        q, k, v = self.qkv(x)
        v_real = v
        valid = None
        if pad_b or pad_r:
            if not self.auto_pad:
                raise ValueError(
                    f"H={h_in} and W={w_in} must be divisible by n_win={n} (or use auto_pad=True)"
                )
            # Tokens are projected one by one, so padding after the projection is the same as
            # padding the input; what the padded tokens hold never reaches the output.
            q, k, v = (F.pad(t, (0, 0, 0, pad_r, 0, pad_b)) for t in (q, k, v))
            rows = torch.arange(q.shape[1], device=x.device) < h_in
            cols = torch.arange(q.shape[2], device=x.device) < w_in
            valid = rows[:, None] & cols[None, :]
        hh, ww = q.shape[1] // n, q.shape[2] // n  # region size

        q_win, k_win = self._region_means(q, k, valid, hh, ww)
        region_valid = None if valid is None else valid.view(n, hh, n, ww).any(3).any(1).flatten()
        r_weight, r_idx = self.router(q_win, k_win, region_valid)

        if chunked:
            key_valid = None
            if valid is not None:
                key_valid = valid.view(n, hh, n, ww).permute(0, 2, 1, 3).reshape(n * n, -1)
            out = region_attention(
                q,
                k,
                v,
                r_idx,
                n_win=n,
                num_heads=self.num_heads,
                scale=self.scale,
                key_valid=key_valid,
            )
            out = out.narrow(1, 0, h_in).narrow(2, 0, w_in)
            del q, k, v
            return self._finish(out, v_real)

        k_pix, v_pix, key_valid = self._pooled_keys(k, v, valid, hh, ww)
        out = routed_attention(
            self._to_regions(q, hh, ww),
            k_pix,
            v_pix,
            r_idx,
            scale=self.scale,
            region_weight=r_weight if self.soft_routing else None,
            key_valid=key_valid,
            backend=self.backend,
        )  # [B, P, M, hh * ww, dim / M]
        out = out.reshape(b, n, n, self.num_heads, hh, ww, -1).permute(0, 1, 4, 2, 5, 3, 6)
        out = out.reshape(b, n * hh, n * ww, self.dim)[:, :h_in, :w_in]
        return self._finish(out, v_real)

    def _region_chunked(self, x: Tensor) -> bool:
        """Whether the fine level runs :func:`region_attention` (BiFormer's own setting:
        unpooled keys, hard routing) rather than :func:`routed_attention`, which keeps the
        Triton kernel of ``topk == 1`` for CUDA inputs and ``backend="triton"``."""
        if not isinstance(self.kv_down, nn.Identity) or self.soft_routing:
            return False
        if self.topk == 1 and (self.backend == "triton" or x.is_cuda):
            return False
        return self.backend != "triton"

    def _lean_forward(self, x: Tensor) -> Tensor:
        """Eager inference on sizes divisible by ``n_win``: the arithmetic of :meth:`forward`
        in less memory and time. One pass over bands of region rows projects k and v, takes
        the routing means and stores keys and values in region order; queries are projected
        only per chunk by :func:`region_rows_attention`. The projection is affine, so the
        query and key region means used for routing are the projection of the input's region
        means. LePE runs band by band into the output buffer, which the attention then adds
        to."""
        b, hgt, wid, _ = x.shape
        n, qk, m, lin = self.n_win, self.qk_dim, self.num_heads, self.qkv.qkv
        hh, ww = hgt // n, wid // n
        tokens = hh * ww
        q_weight, kv_weight = lin.weight[:qk], lin.weight[qk:]
        q_bias = None if lin.bias is None else lin.bias[:qk]
        kv_bias = None if lin.bias is None else lin.bias[qk:]
        k_reg = x.new_empty(b, n, n, m, tokens, qk // m)
        v_reg = x.new_empty(b, n, n, m, tokens, self.dim // m)
        x_win = []
        for i, band in enumerate(x.split(hh, dim=1)):
            k, v = F.linear(band, kv_weight, kv_bias).split([qk, self.dim], dim=-1)
            x_win.append(_region_mean(band, 1, n))
            for src, dst in ((k, k_reg), (v, v_reg)):
                # [B, hh, n, ww, M, d] -> [B, n, M, hh, ww, d]
                src = src.unflatten(-1, (m, -1)).unflatten(2, (n, ww)).permute(0, 2, 4, 1, 3, 5)
                dst[:, i].view(src.shape).copy_(src)
            del k, v
        qk_bias = None if lin.bias is None else lin.bias[: 2 * qk]
        q_win, k_win = F.linear(torch.cat(x_win, 1), lin.weight[: 2 * qk], qk_bias).chunk(2, -1)
        _, r_idx = self.router(q_win, k_win)
        out = self._lepe_bands(v_reg, x)
        out = region_rows_attention(
            x,
            q_weight,
            q_bias,
            k_reg.view(b * n * n, m, tokens, -1),
            v_reg.view(b * n * n, m, tokens, -1),
            r_idx,
            out,
            n_win=n,
            scale=self.scale,
        )
        del k_reg, v_reg
        return self.wo(out)

    def _lepe_bands(self, v_reg: Tensor, x: Tensor) -> Tensor:
        """LePE of region-order values ``[B, n, n, M, h * w, d]`` as a new ``[B, H, W,
        dim]`` tensor, one band of region rows at a time (each band with the ``k // 2``
        neighbouring image rows it needs; zeros beyond the image, as the convolution's
        padding). Zeros without LePE."""
        b, hgt, wid, _ = x.shape
        n = self.n_win
        hh, ww = hgt // n, wid // n
        if self.lepe is None:
            return x.new_zeros(b, hgt, wid, self.dim)
        out = x.new_empty(b, hgt, wid, self.dim)
        pad = self.lepe.padding[0]
        band = x.new_empty(b, hh + 2 * pad, wid, self.dim)  # one band with its halo rows
        m = self.num_heads

        def fill(row0: int, i: int, start: int, stop: int) -> None:
            """Band rows from ``row0`` on <- image rows ``start:stop`` of region row ``i``."""
            src = v_reg[:, i].unflatten(-2, (hh, ww))[..., start:stop, :, :]  # [B,n,M,r,w,d]
            dst = band[:, row0 : row0 + stop - start].view(b, stop - start, n, ww, m, -1)
            dst.copy_(src.permute(0, 3, 1, 4, 2, 5))

        for i in range(n):
            if i > 0:
                fill(0, i - 1, hh - pad, hh)
            else:
                band[:, :pad].zero_()
            fill(pad, i, 0, hh)
            if i < n - 1:
                fill(pad + hh, i + 1, 0, pad)
            else:
                band[:, pad + hh :].zero_()
            conv = F.conv2d(
                band.permute(0, 3, 1, 2),
                self.lepe.weight,
                self.lepe.bias,
                padding=(0, self.lepe.padding[1]),
                groups=self.dim,
            )  # [B, dim, hh, W]
            out[:, i * hh : (i + 1) * hh] = conv.permute(0, 2, 3, 1)
        return out

    def _lean_fits(self, h_in: int, w_in: int) -> bool:
        """Whether :meth:`_lean_forward` serves this size: divisible by ``n_win``, routed
        (not masked dense) attention, and a LePE halo within one neighbouring region row."""
        n = self.n_win
        if h_in % n or w_in % n or use_dense(self.topk, n, (h_in // n) * (w_in // n)):
            return False
        return self.lepe is None or self.lepe.padding[0] <= h_in // n

    def _lepe(self, v: Tensor) -> Tensor | None:
        """LePE of the values ``[B, H, W, dim]`` -> ``[B, H, W, dim]``, or ``None``."""
        if self.lepe is None:
            return None
        return self.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def _finish(self, out: Tensor, v: Tensor) -> Tensor:
        """LePE of the values ``v`` plus the attention output ``out`` (both ``[B, H, W,
        dim]``), then ``wo``."""
        lepe = self._lepe(v)
        if lepe is None:
            return self.wo(out)
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.wo(out + lepe)
        return self.wo(lepe.add_(out))  # eager inference: the fresh LePE buffer takes the sum
