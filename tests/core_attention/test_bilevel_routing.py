"""BiLevelRoutingAttention against an official-style gather reference and a float64 naive one.

``GatherBRA`` below re-implements the semantics of BiFormer's ``ops/bra_legacy.py``
(zero-padding before the projections, region means, top-k routing, ``torch.gather`` of the
routed key/value regions, one softmax, LePE, output projection) with the same submodule
names, so the library module's state dict loads into it strictly. ``naive_bra`` computes the
masked semantics token by token in float64 with an explicit softmax.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core_attention.layers.bilevel_routing import (
    BiLevelRoutingAttention,
    routed_attention,
)

# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------


class _QKV(nn.Module):
    def __init__(self, dim, qk_dim):
        super().__init__()
        self.qk_dim = qk_dim
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim)

    def forward(self, x):
        return self.qkv(x).split([self.qk_dim, self.qk_dim + self.qkv.in_features], dim=-1)


class _Router(nn.Module):
    def __init__(self, qk_dim, topk, scale, param_routing, diff_routing):
        super().__init__()
        self.topk, self.scale, self.diff_routing = topk, scale, diff_routing
        self.emb = nn.Linear(qk_dim, qk_dim) if param_routing else nn.Identity()

    def forward(self, q, k):
        if not self.diff_routing:
            q, k = q.detach(), k.detach()
        logits = (self.emb(q) * self.scale) @ self.emb(k).transpose(-2, -1)
        top_logits, idx = torch.topk(logits, k=self.topk, dim=-1)
        return top_logits.softmax(-1), idx


class GatherBRA(nn.Module):
    """Official-style BRA: the gathered ``[n, p^2, topk, w^2, c]`` copy, padding attends."""

    def __init__(
        self,
        dim,
        num_heads=8,
        n_win=7,
        qk_dim=None,
        qk_scale=None,
        kv_per_win=4,
        kv_downsample_ratio=4,
        kv_downsample_mode="identity",
        topk=4,
        param_attention="qkvo",
        param_routing=False,
        diff_routing=False,
        soft_routing=False,
        side_dwconv=3,
        auto_pad=False,
    ):
        super().__init__()
        self.dim, self.n_win, self.num_heads = dim, n_win, num_heads
        self.qk_dim = qk_dim or dim
        self.scale = qk_scale or self.qk_dim**-0.5
        self.soft_routing, self.auto_pad = soft_routing, auto_pad
        self.lepe = (
            nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
            if side_dwconv > 0
            else None
        )
        self.router = _Router(self.qk_dim, topk, self.scale, param_routing, diff_routing)
        self.qkv = _QKV(dim, self.qk_dim)
        self.wo = nn.Linear(dim, dim) if param_attention == "qkvo" else nn.Identity()
        self.kv_down = {
            "identity": nn.Identity(),
            "ada_avgpool": nn.AdaptiveAvgPool2d(kv_per_win),
            "ada_maxpool": nn.AdaptiveMaxPool2d(kv_per_win),
            "avgpool": nn.AvgPool2d(kv_downsample_ratio),
            "maxpool": nn.MaxPool2d(kv_downsample_ratio),
        }[kv_downsample_mode]

    def forward(self, x):
        n_b, h_in, w_in, _ = x.shape
        nw = self.n_win
        pad_r, pad_b = (nw - w_in % nw) % nw, (nw - h_in % nw) % nw
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        _, H, W, C = x.shape
        h, w = H // nw, W // nw
        # n (j h) (i w) c -> n (j i) h w c
        x = x.reshape(n_b, nw, h, nw, w, C).permute(0, 1, 3, 2, 4, 5).reshape(n_b, nw * nw, h, w, C)
        q, kv = self.qkv(x)
        p2 = nw * nw
        q_pix = q.reshape(n_b, p2, h * w, self.qk_dim)
        kv_pix = self.kv_down(kv.reshape(n_b * p2, h, w, -1).permute(0, 3, 1, 2))
        kv_pix = kv_pix.reshape(n_b, p2, kv_pix.shape[1], -1).transpose(-1, -2)
        q_win, k_win = q.mean([2, 3]), kv[..., : self.qk_dim].mean([2, 3])
        v_img = kv[..., self.qk_dim :].reshape(n_b, nw, nw, h, w, C)
        v_img = v_img.permute(0, 5, 1, 3, 2, 4).reshape(n_b, C, H, W)
        lepe = self.lepe(v_img).permute(0, 2, 3, 1) if self.lepe is not None else 0.0

        r_weight, r_idx = self.router(q_win, k_win)
        topk, w2, ckv = r_idx.shape[-1], kv_pix.shape[2], kv_pix.shape[3]
        sel = torch.gather(
            kv_pix.view(n_b, 1, p2, w2, ckv).expand(-1, p2, -1, -1, -1),
            dim=2,
            index=r_idx.view(n_b, p2, topk, 1, 1).expand(-1, -1, -1, w2, ckv),
        )
        if self.soft_routing:
            sel = r_weight.view(n_b, p2, topk, 1, 1) * sel
        k_sel, v_sel = sel.split([self.qk_dim, self.dim], dim=-1)
        m = self.num_heads
        # n p2 k w2 (m c) -> (n p2) m c (k w2)  and  -> (n p2) m (k w2) c
        k_sel = k_sel.reshape(n_b * p2, topk * w2, m, -1).permute(0, 2, 3, 1)
        v_sel = v_sel.reshape(n_b * p2, topk * w2, m, -1).transpose(1, 2)
        q_pix = q_pix.reshape(n_b * p2, h * w, m, -1).transpose(1, 2)
        attn = ((q_pix * self.scale) @ k_sel).softmax(-1)
        out = attn @ v_sel  # (n p2) m (h w) c -> n (j h) (i w) (m c)
        out = (
            out.reshape(n_b, nw, nw, m, h, w, -1).permute(0, 1, 4, 2, 5, 3, 6).reshape(n_b, H, W, C)
        )
        out = self.wo(out + lepe)
        return out[:, :h_in, :w_in].contiguous()


def _bins(length: int, mod: BiLevelRoutingAttention) -> list[range]:
    """Token ranges pooled into one key along a region side of ``length`` tokens."""
    mode = mod.kv_downsample_mode
    if mode.startswith("ada_"):
        o = mod.kv_per_win
        return [range(i * length // o, -(-(i + 1) * length // o)) for i in range(o)]
    r = mod.kv_downsample_ratio if mode != "identity" else 1
    return [range(i * r, i * r + r) for i in range(length // r)]


@torch.no_grad()
def naive_bra(module: BiLevelRoutingAttention, x: torch.Tensor) -> torch.Tensor:
    """Float64 token-by-token BRA with padded tokens excluded from routing means, from the
    (pooled) keys and from LePE."""
    mod = module.double()
    x = x.double()
    n_b, h_in, w_in, c = x.shape
    nw = mod.n_win
    h, w = -(-h_in // nw), -(-w_in // nw)  # region size after padding
    qkv = x @ mod.qkv.qkv.weight.T + mod.qkv.qkv.bias
    q, k, v = qkv.split([mod.qk_dim, mod.qk_dim, c], dim=-1)
    regions = {}  # region id -> real token coordinates
    for y, xx in itertools.product(range(h_in), range(w_in)):
        regions.setdefault((y // h) * nw + xx // w, []).append((y, xx))
    out = torch.zeros(n_b, h_in, w_in, c, dtype=torch.float64)
    m, dh, dv = mod.num_heads, mod.qk_dim // mod.num_heads, c // mod.num_heads
    is_max = mod.kv_downsample_mode.endswith("maxpool")
    for bi in range(n_b):
        q_win = torch.zeros(nw * nw, mod.qk_dim, dtype=torch.float64)
        k_win = torch.zeros(nw * nw, mod.qk_dim, dtype=torch.float64)
        real = torch.zeros(nw * nw, dtype=torch.bool)
        keys = {}  # region id -> (k rows, v rows) of its pooled keys over real tokens
        for r, toks in regions.items():
            ys, xs = zip(*toks)
            q_win[r] = q[bi, list(ys), list(xs)].mean(0)
            k_win[r] = k[bi, list(ys), list(xs)].mean(0)
            real[r] = True
            y0, x0 = (r // nw) * h, (r % nw) * w
            ks, vs = [], []
            for by, bx in itertools.product(_bins(h, mod), _bins(w, mod)):
                cell = [(y0 + i, x0 + j) for i in by for j in bx if (y0 + i, x0 + j) in toks]
                if not cell:
                    continue
                cy, cx = zip(*cell)
                kc, vc = k[bi, list(cy), list(cx)], v[bi, list(cy), list(cx)]
                ks.append(kc.amax(0) if is_max else kc.mean(0))
                vs.append(vc.amax(0) if is_max else vc.mean(0))
            keys[r] = (torch.stack(ks), torch.stack(vs))
        emb = mod.router.emb
        logits = (emb(q_win) * mod.scale) @ emb(k_win).T
        logits[:, ~real] = float("-inf")
        top, idx = torch.topk(logits, mod.topk, dim=-1)
        weight = top.softmax(-1)
        for r, toks in regions.items():
            kk, vv = [], []
            for t in range(mod.topk):
                if int(idx[r, t]) in keys:
                    wt = weight[r, t] if mod.soft_routing else 1.0
                    kk.append(keys[int(idx[r, t])][0] * wt)
                    vv.append(keys[int(idx[r, t])][1] * wt)
            kk, vv = torch.cat(kk), torch.cat(vv)
            for (y, xx), head in itertools.product(toks, range(m)):
                qh = q[bi, y, xx, head * dh : (head + 1) * dh]
                s = (kk[:, head * dh : (head + 1) * dh] @ qh) * mod.scale
                p = torch.exp(s - s.max())
                out[bi, y, xx, head * dv : (head + 1) * dv] = (p / p.sum()) @ vv[
                    :, head * dv : (head + 1) * dv
                ]
    if mod.lepe is not None:
        out = out + F.conv2d(
            v.permute(0, 3, 1, 2),
            mod.lepe.weight,
            mod.lepe.bias,
            padding=mod.lepe.padding,
            groups=c,
        ).permute(0, 2, 3, 1)
    return mod.wo(out)


def _pair(**kwargs):
    mine = BiLevelRoutingAttention(**kwargs)
    _randomize(mine)
    ref = GatherBRA(**{k: v for k, v in kwargs.items() if k != "kv_downsample_kernel"})
    ref.load_state_dict(mine.state_dict(), strict=True)
    return mine, ref


def _randomize(module: nn.Module) -> None:
    """Fan-in scaled weights and non-zero biases (padded tokens project to the bias)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3 if p.dim() == 1 else p[0].numel() ** -0.5)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------------------------
# Official semantics on divisible sizes
# --------------------------------------------------------------------------------------------

CONFIGS = [
    {"dim": 32, "num_heads": 2, "n_win": 4, "topk": 1, "side_dwconv": 5},
    {"dim": 32, "num_heads": 4, "n_win": 4, "topk": 4, "qk_dim": 16, "side_dwconv": 3},
    {
        "dim": 24,
        "num_heads": 3,
        "n_win": 3,
        "topk": 9,
        "qk_scale": 0.3,
        "side_dwconv": 0,
        "param_attention": "qkv",
    },
    {"dim": 16, "num_heads": 2, "n_win": 4, "topk": 3, "soft_routing": True},
    {
        "dim": 16,
        "num_heads": 2,
        "n_win": 4,
        "topk": 2,
        "param_routing": True,
        "diff_routing": True,
        "soft_routing": True,
    },
    {
        "dim": 16,
        "num_heads": 2,
        "n_win": 2,
        "topk": 2,
        "kv_downsample_mode": "ada_avgpool",
        "kv_per_win": 2,
    },
    {
        "dim": 16,
        "num_heads": 2,
        "n_win": 2,
        "topk": 3,
        "kv_downsample_mode": "maxpool",
        "kv_downsample_ratio": 2,
    },
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_matches_gather_reference(cfg):
    mine, ref = _pair(**cfg)
    n_win = cfg["n_win"]
    x = torch.randn(2, 3 * n_win, 2 * n_win, cfg["dim"])  # regions of 3x2 tokens (odd)
    if cfg.get("kv_downsample_mode", "identity") != "identity":
        x = torch.randn(2, 4 * n_win, 6 * n_win, cfg["dim"])
    out = mine(x)
    expected = ref(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert _rel_err(out, expected) < 1e-5


def test_biformer_t_stage1_config_matches_reference():
    """BiFormer-T stage 1 block: dim 64, 2 heads, n_win 7, topk 1, LePE 5x5."""
    mine, ref = _pair(dim=64, num_heads=2, n_win=7, qk_dim=64, topk=1, side_dwconv=5)
    x = torch.randn(1, 28, 28, 64)
    torch.testing.assert_close(mine(x), ref(x), atol=1e-5, rtol=0)


def test_gradients_match_gather_reference():
    mine, ref = _pair(
        dim=16,
        num_heads=2,
        n_win=3,
        topk=4,
        param_routing=True,
        diff_routing=True,
        soft_routing=True,
    )
    x = torch.randn(2, 6, 9, 16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    g = torch.randn(2, 6, 9, 16)
    (mine(x) * g).sum().backward()
    (ref(x_ref) * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    ref_params = dict(ref.named_parameters())
    for name, p in mine.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, atol=1e-5, rtol=1e-5)


def test_state_dict_keys_and_shapes_equal_official_names():
    mine, ref = _pair(
        dim=64,
        num_heads=2,
        n_win=7,
        topk=4,
        side_dwconv=5,
        param_routing=True,
        diff_routing=True,
        soft_routing=True,
    )
    ours = {k: tuple(v.shape) for k, v in mine.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours == theirs
    assert set(ours) == {
        "qkv.qkv.weight",
        "qkv.qkv.bias",
        "wo.weight",
        "wo.bias",
        "lepe.weight",
        "lepe.bias",
        "router.emb.weight",
        "router.emb.bias",
    }
    assert ours["qkv.qkv.weight"] == (64 + 64 + 64, 64)
    assert ours["lepe.weight"] == (64, 1, 5, 5)


# --------------------------------------------------------------------------------------------
# Float64 naive reference, padding
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "cfg"),
    [
        ((6, 4), {"n_win": 2, "topk": 2}),  # divisible
        ((5, 7), {"n_win": 3, "topk": 2, "soft_routing": True}),
        ((8, 3), {"n_win": 3, "topk": 9}),  # whole padded regions, topk > real regions
        (
            (7, 5),
            {"n_win": 2, "topk": 2, "kv_downsample_mode": "avgpool", "kv_downsample_ratio": 2},
        ),
        (
            (7, 5),
            {"n_win": 2, "topk": 3, "kv_downsample_mode": "maxpool", "kv_downsample_ratio": 2},
        ),
        ((9, 6), {"n_win": 2, "topk": 2, "kv_downsample_mode": "ada_avgpool", "kv_per_win": 2}),
        ((9, 4), {"n_win": 2, "topk": 1, "kv_downsample_mode": "ada_maxpool", "kv_per_win": 3}),
    ],
)
def test_matches_naive_float64_with_masked_padding(size, cfg):
    mine = BiLevelRoutingAttention(dim=8, num_heads=2, side_dwconv=3, auto_pad=True, **cfg)
    _randomize(mine)
    x = torch.randn(2, *size, 8)
    expected = naive_bra(mine, x)
    mine = mine.float()
    out = mine(x)
    assert _rel_err(out.double(), expected) < 1e-5
    out64 = mine.double()(x.double())
    torch.testing.assert_close(out64, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(
    ("size", "cfg"),
    [
        ((15, 17), {"n_win": 7, "topk": 4, "soft_routing": True, "side_dwconv": 5}),
        (
            (7, 5),
            {"n_win": 2, "topk": 2, "kv_downsample_mode": "avgpool", "kv_downsample_ratio": 2},
        ),
        ((9, 4), {"n_win": 2, "topk": 3, "kv_downsample_mode": "ada_maxpool", "kv_per_win": 3}),
    ],
)
def test_padded_content_does_not_change_output(size, cfg, monkeypatch):
    """Fill every padded position with large noise instead of zeros: the output must not
    move (the official module's would, see the docstring)."""
    mine = BiLevelRoutingAttention(dim=16, num_heads=2, auto_pad=True, **cfg)
    _randomize(mine)
    x = torch.randn(2, *size, 16)
    out = mine(x)

    import core_attention.layers.bilevel_routing as bra_mod

    real_pad = F.pad
    calls = []

    def pad_with_noise(t, pad, *args, **kwargs):
        calls.append(tuple(pad))
        padded = real_pad(t, pad, *args, **kwargs)
        inside = real_pad(torch.ones_like(t, dtype=torch.bool), pad)
        return torch.where(inside, padded, 5.0 * torch.randn_like(padded))

    monkeypatch.setattr(bra_mod.F, "pad", pad_with_noise)
    out_noisy = mine(x)
    monkeypatch.undo()
    assert calls, "the module did not pad"
    torch.testing.assert_close(out_noisy, out, atol=1e-5, rtol=0)

    ref = GatherBRA(dim=16, num_heads=2, auto_pad=True, **cfg)
    ref.load_state_dict(mine.state_dict())
    assert (ref(x) - out).abs().max() > 1e-3  # the official semantics differ here


def test_non_divisible_without_auto_pad_raises():
    mine = BiLevelRoutingAttention(dim=8, num_heads=2, n_win=3, topk=2)
    with pytest.raises(ValueError, match="divisible by n_win"):
        mine(torch.randn(1, 7, 6, 8))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"topk": -1}, "full-attention block"),
        ({"topk": 10}, "topk must be in"),
        ({"param_routing": True}, "needs diff_routing"),
        ({"diff_routing": True}, "needs soft_routing"),
        ({"kv_downsample_mode": "fracpool"}, "kv_downsample_mode"),
        ({"num_heads": 3}, "divisible by num_heads"),
    ],
)
def test_invalid_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BiLevelRoutingAttention(**{"dim": 8, "num_heads": 2, "n_win": 3, **kwargs})


# --------------------------------------------------------------------------------------------
# routed_attention itself
# --------------------------------------------------------------------------------------------


def _naive_routed(q, k, v, idx, scale, weight=None, key_valid=None):
    b, p, m, nq, _ = q.shape
    out = torch.zeros(b, p, m, nq, v.shape[-1], dtype=q.dtype)
    for bi, pi in itertools.product(range(b), range(p)):
        ks, vs, masks = [], [], []
        for t in range(idx.shape[-1]):
            r = int(idx[bi, pi, t])
            w = 1.0 if weight is None else weight[bi, pi, t]
            ks.append(k[bi, r] * w)
            vs.append(v[bi, r] * w)
            masks.append(
                torch.ones(k.shape[3], dtype=torch.bool) if key_valid is None else key_valid[r]
            )
        kk, vv, mask = torch.cat(ks, 1), torch.cat(vs, 1), torch.cat(masks)
        s = (q[bi, pi] * scale) @ kk.transpose(-1, -2)
        s = s.masked_fill(~mask, float("-inf"))
        p_ = torch.softmax(s, -1)
        out[bi, pi] = (p_ @ vv).nan_to_num(0.0)
    return out


def _routed_inputs(dtype, weight=True, mask=True, small=False, topk=None):
    b, p, pk, m, nq, nk, d, dv, t = (
        (1, 2, 3, 2, 3, 3, 3, 2, 2) if small else (2, 3, 4, 2, 5, 3, 4, 3, 3)
    )
    t = topk or t
    q = torch.randn(b, p, m, nq, d, dtype=dtype)
    k = torch.randn(b, pk, m, nk, d, dtype=dtype)
    v = torch.randn(b, pk, m, nk, dv, dtype=dtype)
    idx = torch.stack([torch.randperm(pk)[:t] for _ in range(b * p)]).view(b, p, t)
    w = torch.rand(b, p, t, dtype=dtype) + 0.5 if weight else None
    valid = None
    if mask:
        valid = torch.rand(pk, nk) > 0.4
        valid[0] = False  # a region with no valid key at all
        valid[1, 0] = True
    return q, k, v, idx, w, valid


@pytest.mark.parametrize("topk", [1, 3])
@pytest.mark.parametrize(("weight", "mask"), [(False, False), (True, False), (True, True)])
def test_routed_attention_matches_naive(weight, mask, topk):
    q, k, v, idx, w, valid = _routed_inputs(torch.float64, weight, mask, topk=topk)
    expected = _naive_routed(q, k, v, idx, 0.7, w, valid)
    out64 = routed_attention(q, k, v, idx, scale=0.7, region_weight=w, key_valid=valid)
    torch.testing.assert_close(out64, expected, atol=1e-12, rtol=1e-12)
    f = [t.float() if t is not None and t.is_floating_point() else t for t in (q, k, v, w)]
    out32 = routed_attention(f[0], f[1], f[2], idx, scale=0.7, region_weight=f[3], key_valid=valid)
    assert _rel_err(out32.double(), expected) < 1e-5


@pytest.mark.parametrize("topk", [1, 3])
def test_routed_attention_all_masked_row_is_zero(topk):
    q, k, v, idx, w, valid = _routed_inputs(torch.float64, True, True, topk=topk)
    valid[:] = False
    q.requires_grad_(True)
    out = routed_attention(q, k, v, idx, scale=1.0, region_weight=w, key_valid=valid)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


@pytest.mark.parametrize(
    ("weight", "mask", "topk"), [(False, False, 2), (True, True, 2), (True, True, 1)]
)
def test_routed_attention_gradcheck(weight, mask, topk):
    q, k, v, idx, w, valid = _routed_inputs(torch.float64, weight, mask, small=True, topk=topk)
    inputs = [t.requires_grad_(True) for t in (q, k, v)] + (
        [w.requires_grad_(True)] if weight else []
    )

    def fn(q, k, v, w=None):
        return routed_attention(q, k, v, idx, scale=0.7, region_weight=w, key_valid=valid)

    assert torch.autograd.gradcheck(fn, inputs)


def test_module_gradcheck_float64_padded():
    mine = BiLevelRoutingAttention(
        dim=4,
        num_heads=2,
        n_win=2,
        topk=2,
        side_dwconv=3,
        auto_pad=True,
        param_routing=True,
        diff_routing=True,
        soft_routing=True,
    ).double()
    x = torch.randn(1, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(mine, (x,), fast_mode=True)


# --------------------------------------------------------------------------------------------
# torch.compile / torch.export
# --------------------------------------------------------------------------------------------


def test_torch_compile_aot_eager_forward_backward():
    mine = BiLevelRoutingAttention(
        dim=16, num_heads=2, n_win=3, topk=3, side_dwconv=3, auto_pad=True, soft_routing=True
    )
    x = torch.randn(2, 7, 8, 16, requires_grad=True)
    out = torch.compile(mine, backend="aot_eager", fullgraph=True)(x)
    out.sum().backward()
    grad_c = x.grad.clone()
    x.grad = None
    expected = mine(x)
    expected.sum().backward()
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad_c, x.grad, atol=1e-6, rtol=1e-6)


def test_torch_compile_dynamic_shapes():
    """One graph with symbolic sizes serves divisible and padded inputs alike (topk=1: the
    core_attention.attention path)."""
    torch._dynamo.reset()
    mine = BiLevelRoutingAttention(dim=8, num_heads=2, n_win=2, topk=1, auto_pad=True)
    compiled = torch.compile(mine, backend="aot_eager", fullgraph=True, dynamic=True)
    with torch.no_grad():
        for size in ((5, 6), (8, 8), (7, 9)):
            x = torch.randn(1, *size, 8)
            torch.testing.assert_close(compiled(x), mine(x), atol=1e-6, rtol=1e-6)


def test_torch_export_inference():
    mine = BiLevelRoutingAttention(
        dim=16, num_heads=2, n_win=3, topk=2, side_dwconv=3, auto_pad=True
    ).eval()
    x = torch.randn(1, 8, 7, 16)
    with torch.no_grad():
        ep = torch.export.export(mine, (x,))
        torch.testing.assert_close(ep.module()(x), mine(x), atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_torch_compile_inductor_forward_backward():
    """The one inductor compile of the suite's attention layers: codegen of the topk loop
    and of the recomputing backward."""
    mine = BiLevelRoutingAttention(
        dim=8, num_heads=2, n_win=2, topk=2, side_dwconv=3, auto_pad=True, soft_routing=True
    )
    x = torch.randn(1, 5, 6, 8, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(mine, backend="inductor", dynamic=False)
    out = compiled(x)
    out.sum().backward()
    grad = x.grad.clone()
    x.grad = None
    expected = mine(x)
    expected.sum().backward()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, x.grad, atol=1e-5, rtol=1e-5)
