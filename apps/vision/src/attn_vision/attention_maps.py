"""Where a query token attends, read from a trained layer's own weights.

For a layer and a query token, the attention probabilities over the layer's token grid
(per head, ``[heads, H, W]``) are recomputed from the layer's input, with the layer's
projections, routing and position terms:

* ``BiLevelRoutingAttention`` (BiFormer, Zhu et al. CVPR 2023): the query's region, the
  ``topk`` regions its router picks (mean query/key affinity over real tokens), and one
  softmax over the tokens of those regions;
* ``AttentionLePE`` (BiFormer stage 4): one softmax over all tokens;
* ``HaloAttention`` (HaloNet, Vaswani et al. CVPR 2021, stride 1): one softmax over the
  query block's window, relative-position logits included; probability that falls on the
  zero keys of the halo outside the image is reported as ``outside``.

``probs @ values`` of the returned map reproduces the layer's attention output at the
query (tests check this), so the pictures show what the network computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attn_vision.models.biformer import AttentionLePE
from core_attention.layers.bilevel_routing import BiLevelRoutingAttention
from core_attention.layers.halo import HaloAttention

ATTENTION_TYPES = (BiLevelRoutingAttention, AttentionLePE, HaloAttention)


@dataclass
class QueryAttention:
    """Attention of one query token of one layer (batch item 0)."""

    query: tuple[int, int]
    """``(row, col)`` on the layer's token grid."""
    probs: Tensor
    """``[heads, H, W]`` probabilities on the token grid (zero where not attended)."""
    outside: Tensor | None = None
    """``[heads]`` probability on zero keys beyond the image border (halo attention)."""
    query_region: tuple[int, int, int, int] | None = None
    """``(top, left, height, width)`` of the query's region (routing attention)."""
    routed_regions: list[tuple[int, int, int, int]] = field(default_factory=list)
    """Regions the query's region is routed to, most affine first (routing attention)."""


def grid_shape(module: nn.Module, layer_input: Tensor) -> tuple[int, int]:
    """Token grid ``(H, W)`` of a layer input (NHWC for BiFormer layers, NCHW for halo)."""
    if isinstance(module, HaloAttention):
        return tuple(layer_input.shape[-2:])
    return tuple(layer_input.shape[1:3])


def attention_of(module: nn.Module, layer_input: Tensor, query: tuple[int, int]) -> QueryAttention:
    """Per-head attention of token ``query`` of ``module`` given its input (batch item 0)."""
    with torch.no_grad():
        if isinstance(module, BiLevelRoutingAttention):
            return _routing(module, layer_input[:1], query)
        if isinstance(module, AttentionLePE):
            return _global(module, layer_input[:1], query)
        if isinstance(module, HaloAttention):
            return _halo(module, layer_input[:1], query)
    raise TypeError(f"no attention map for {type(module).__name__}")


def _heads(t: Tensor, m: int) -> Tensor:
    """``[..., m * d]`` -> ``[m, ..., d]``."""
    return t.reshape(*t.shape[:-1], m, -1).movedim(-2, 0)


def _routing(mod: BiLevelRoutingAttention, x: Tensor, query: tuple[int, int]) -> QueryAttention:
    if mod.kv_downsample_mode != "identity":
        raise ValueError("attention maps need kv_downsample_mode='identity' (BiFormer's)")
    _, h, w, _ = x.shape
    n = mod.n_win
    hp, wp = -(-h // n) * n, -(-w // n) * n
    hh, ww = hp // n, wp // n
    x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
    q, k, _ = mod.qkv(x)
    valid = torch.zeros(hp, wp, dtype=torch.bool)
    valid[:h, :w] = True

    def region_mean(t: Tensor) -> Tensor:
        t = t[0].reshape(n, hh, n, ww, -1)
        mask = valid.reshape(n, hh, n, ww, 1).to(t.dtype)
        return ((t * mask).sum((1, 3)) / mask.sum((1, 3)).clamp_min(1)).reshape(n * n, -1)

    region_valid = valid.reshape(n, hh, n, ww).any(3).any(1).flatten()
    weights, idx = mod.router(region_mean(q)[None], region_mean(k)[None], region_valid)
    qy, qx = query
    r = (qy // hh) * n + qx // ww
    routed = idx[0, r].tolist()
    m = mod.num_heads
    qh = _heads(q[0, qy, qx], m)  # [m, d]
    kh = _heads(k[0], m)  # [m, Hp, Wp, d]
    logits = torch.einsum("md,mhwd->mhw", qh, kh) * mod.scale
    keep = torch.zeros(hp, wp, dtype=torch.bool)
    for t, region in enumerate(routed):
        ry, rx = divmod(region, n)
        block = (slice(ry * hh, (ry + 1) * hh), slice(rx * ww, (rx + 1) * ww))
        keep[block] = True
        if mod.soft_routing:
            logits[(slice(None), *block)] *= weights[0, r, t]
    keep &= valid
    probs = logits.masked_fill(~keep, float("-inf")).flatten(1).softmax(-1).reshape(m, hp, wp)

    def box(region: int) -> tuple[int, int, int, int]:
        ry, rx = divmod(region, n)
        return (ry * hh, rx * ww, hh, ww)

    return QueryAttention(
        query=query,
        probs=probs[:, :h, :w],
        query_region=box(r),
        routed_regions=[box(g) for g in routed if region_valid[g]],
    )


def _global(mod: AttentionLePE, x: Tensor, query: tuple[int, int]) -> QueryAttention:
    _, h, w, c = x.shape
    m = mod.num_heads
    q, k, _ = mod.qkv(x[0]).split(c, dim=-1)
    qh, kh = _heads(q[query], m), _heads(k, m)  # [m, d], [m, H, W, d]
    logits = torch.einsum("md,mhwd->mhw", qh, kh) * qh.shape[-1] ** -0.5
    return QueryAttention(query=query, probs=logits.flatten(1).softmax(-1).reshape(m, h, w))


def _halo(mod: HaloAttention, x: Tensor, query: tuple[int, int]) -> QueryAttention:
    if mod.block_stride != 1 or not isinstance(mod.pool, nn.Identity):
        raise ValueError("attention maps are drawn for stride-1 halo layers only")
    _, _, h, w = x.shape
    bs, hs, win, m = mod.block_size, mod.halo_size, mod.win_size, mod.num_heads
    qy, qx = query
    by, bx = qy // bs, qx // bs
    hp, wp = -(-h // bs) * bs, -(-w // bs) * bs
    q = mod.q(F.pad(x, (0, wp - w, 0, hp - h)))[0]  # [m * dqk, Hp, Wp]
    q_block = q[:, by * bs : (by + 1) * bs, bx * bs : (bx + 1) * bs]
    q_block = q_block.reshape(m, mod.dim_head_qk, bs * bs).transpose(1, 2)  # [m, bs^2, d]
    rel = mod.pos_embed(q_block)[:, (qy - by * bs) * bs + (qx - bx * bs)]  # [m, win^2]
    kv = F.pad(mod.kv(x), (hs, hs + wp - w, hs, hs + hp - h))[0]
    window = kv[:, by * bs : by * bs + win, bx * bs : bx * bs + win]
    # channels are grouped per head: [k (dim_head_qk), v (dim_head_v)] for each head
    k = window.reshape(m, mod.dim_head_qk + mod.dim_head_v, win * win)[:, : mod.dim_head_qk]
    qv = q_block[:, (qy - by * bs) * bs + (qx - bx * bs)]  # [m, d]
    logits = torch.einsum("md,mdk->mk", qv, k)
    logits = (logits + rel) * mod.scale if mod.scale_pos_embed else logits * mod.scale + rel
    # image coordinates of the window's rows and columns
    rows = torch.arange(win) + by * bs - hs
    cols = torch.arange(win) + bx * bs - hs
    # keys beyond the zero ring exist only because the last block was completed: masked
    exists = (rows < h + hs)[:, None] & (cols < w + hs)[None, :]
    probs = logits.masked_fill(~exists.flatten(), float("-inf")).softmax(-1).reshape(m, win, win)
    r_in, c_in = (rows >= 0) & (rows < h), (cols >= 0) & (cols < w)
    grid = torch.zeros(m, h, w, dtype=probs.dtype)
    grid[:, rows[r_in][:, None], cols[c_in][None, :]] = probs[:, r_in][:, :, c_in]
    outside = probs.sum((1, 2)) - grid.sum((1, 2))
    return QueryAttention(query=query, probs=grid, outside=outside)


def attention_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every attention module with a map (stride-1 halo layers only), by module path."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, HaloAttention) and (
            mod.block_stride != 1 or not isinstance(mod.pool, nn.Identity)
        ):
            continue
        if isinstance(mod, ATTENTION_TYPES):
            out[name] = mod
    return out


def default_layers(model: nn.Module, limit: int = 4) -> list[str]:
    """The last attention layer of each stage (BiFormer), else the last ``limit`` layers."""
    layers = list(attention_layers(model))
    stages: dict[str, str] = {}
    for name in layers:
        if name.startswith("stages.") and ".blocks." in name:
            stages[name.split(".blocks.")[0]] = name
    chosen = list(stages.values()) or layers
    return chosen[-limit:]


def capture_inputs(model: nn.Module, images: Tensor, names: list[str]) -> dict[str, Tensor]:
    """Run ``model`` on ``images`` and keep the input of each module in ``names``."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise KeyError(f"no module named {', '.join(missing)}")
    inputs: dict[str, Tensor] = {}
    hooks = [
        modules[n].register_forward_pre_hook(
            lambda _m, args, n=n: inputs.__setitem__(n, args[0].detach())
        )
        for n in names
    ]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in hooks:
            h.remove()
    return inputs
