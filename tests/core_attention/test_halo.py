"""HaloAttention against timm's HaloAttn (same weights) and a float64 pixel-by-pixel reference.

``naive_halo`` builds, for every output pixel, the key list of its block's window by hand:
pixels of the image, zero vectors within ``halo_size`` outside it (timm's zero padding),
nothing beyond (the keys that only exist because the last block was completed); then an
explicit softmax of ``q . k * scale`` plus the relative logits.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from timm.layers.halo_attn import HaloAttn
from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg

from core_attention.layers.halo import HaloAttention


def _pair(**kwargs):
    ours = HaloAttention(**kwargs)
    theirs = HaloAttn(**kwargs)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.5 if p.dim() == 1 else p[0].numel() ** -0.5)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def naive_halo(mod: HaloAttention, x: torch.Tensor) -> torch.Tensor:
    mod = mod.double()
    x = x.double()
    n_b, _, H, W = x.shape
    bs, hs, win, heads = mod.block_size, mod.halo_size, mod.win_size, mod.num_heads
    dqk, dv = mod.dim_head_qk, mod.dim_head_v
    avg = not isinstance(mod.pool, torch.nn.Identity)
    stride = mod.block_stride
    kv = torch.nn.functional.conv2d(x, mod.kv.weight, mod.kv.bias)  # [B, heads*(dqk+dv), H, W]
    q_full = torch.nn.functional.conv2d(x, mod.q.weight, mod.q.bias)  # stride-1 queries
    oh, ow = math.ceil(H / stride), math.ceil(W / stride)
    out = torch.zeros(n_b, heads * dv, oh, ow, dtype=torch.float64)
    bsd = mod.block_size_ds
    for bi, yo, xo, hd in itertools.product(range(n_b), range(oh), range(ow), range(heads)):
        y, xx = yo * stride, xo * stride  # input pixel of this query
        by, bx = y // bs, xx // bs
        qy, qx = yo - by * bsd, xo - bx * bsd  # position inside the (downsampled) block
        qv = q_full[bi, hd * dqk : (hd + 1) * dqk, y, xx]
        logits, values = [], []
        for i, j in itertools.product(range(win), range(win)):
            ky, kx = by * bs - hs + i, bx * bs - hs + j
            if not (-hs <= ky < H + hs and -hs <= kx < W + hs):
                continue  # exists only because the grid was completed: masked
            c0 = hd * (dqk + dv)
            if 0 <= ky < H and 0 <= kx < W:
                kvec, vvec = kv[bi, c0 : c0 + dqk, ky, kx], kv[bi, c0 + dqk : c0 + dqk + dv, ky, kx]
            else:  # zero padding of timm
                kvec, vvec = (
                    torch.zeros(dqk, dtype=torch.float64),
                    torch.zeros(dv, dtype=torch.float64),
                )
            rel = (
                qv @ mod.pos_embed.height_rel[i - qy + win - 1]
                + qv @ mod.pos_embed.width_rel[j - qx + win - 1]
            )
            if mod.scale_pos_embed:
                logit = (qv @ kvec + rel) * mod.scale
            else:
                logit = qv @ kvec * mod.scale + rel
            logits.append(logit)
            values.append(vvec)
        logits = torch.stack(logits)
        p = torch.exp(logits - logits.max())
        p = p / p.sum()
        out[bi, hd * dv : (hd + 1) * dv, yo, xo] = p @ torch.stack(values)
    if avg:
        out = torch.nn.functional.avg_pool2d(out, 2, 2)
    return out


TIMM_CONFIGS = [
    {"dim": 16, "num_heads": 2, "block_size": 4, "halo_size": 1},
    {"dim": 16, "dim_out": 24, "num_heads": 3, "block_size": 4, "halo_size": 2, "qkv_bias": True},
    {
        "dim": 32,
        "num_heads": 4,
        "dim_head": 4,
        "block_size": 8,
        "halo_size": 3,
        "scale_pos_embed": True,
    },
    {"dim": 24, "num_heads": 2, "block_size": 7, "halo_size": 2, "qk_ratio": 0.33},
    {"dim": 16, "num_heads": 2, "block_size": 4, "halo_size": 2, "stride": 2},
    {"dim": 16, "num_heads": 2, "block_size": 4, "halo_size": 1, "stride": 2, "avg_down": True},
    {"dim": 16, "num_heads": 2, "block_size": 5, "halo_size": 1, "stride": 2},  # odd: avg pool
    {"dim": 8, "num_heads": 1, "block_size": 4, "halo_size": 0},
]


@pytest.mark.parametrize(
    "cfg", TIMM_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items())
)
def test_matches_timm_halo_attn(cfg):
    ours, theirs = _pair(**cfg)
    bs = cfg["block_size"]
    x = torch.randn(2, cfg["dim"], 3 * bs, 2 * bs)
    expected = theirs(x)
    with torch.no_grad():
        out_inference = ours(x)  # core_attention.attention
    for out in (ours(x), out_inference):  # explicit path when gradients are needed
        assert out.shape == expected.shape
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
        assert _rel_err(out, expected) < 1e-5


def test_gradients_match_timm():
    ours, theirs = _pair(dim=16, num_heads=2, block_size=4, halo_size=2, qkv_bias=True)
    x = torch.randn(2, 16, 8, 12, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    g = torch.randn(2, 16, 8, 12)
    (ours(x) * g).sum().backward()
    (theirs(x2) * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs_params[name].grad, atol=1e-5, rtol=1e-5)


def test_state_dict_and_buffers_equal_timm():
    cfg = {
        "dim": 64,
        "dim_out": 32,
        "num_heads": 4,
        "block_size": 8,
        "halo_size": 3,
        "qkv_bias": True,
        "stride": 2,
    }
    ours, theirs = HaloAttention(**cfg), HaloAttn(**cfg)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    for attr in (
        "dim_head_qk",
        "dim_head_v",
        "dim_out_qk",
        "dim_out_v",
        "scale",
        "win_size",
        "block_stride",
        "block_size_ds",
    ):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert type(ours.pool) is type(theirs.pool)


def test_swaps_into_timm_byobnet():
    """A small ByobNet built with our class as ``self_attn_layer`` equals timm's 'halo'."""

    def model(layer):
        cfg = ByoModelCfg(
            blocks=(
                ByoBlockCfg(type="self_attn", d=1, c=32, s=1, gs=0, br=0.5),
                ByoBlockCfg(type="self_attn", d=2, c=64, s=2, gs=0, br=0.5),
            ),
            stem_chs=16,
            stem_type="3x3",
            stem_pool="",
            self_attn_layer=layer,
            self_attn_kwargs={"block_size": 4, "halo_size": 1, "num_heads": 2},
        )
        return ByobNet(cfg, num_classes=5).eval()

    torch.manual_seed(1)
    theirs = model("halo")
    ours = model(HaloAttention)
    assert sum(isinstance(m, HaloAttention) for m in ours.modules()) == 3
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("size", "cfg"),
    [
        ((8, 8), {"block_size": 4, "halo_size": 1}),  # divisible: the reference is timm's
        ((7, 10), {"block_size": 4, "halo_size": 1}),
        ((5, 9), {"block_size": 4, "halo_size": 2, "scale_pos_embed": True, "qkv_bias": True}),
        ((9, 6), {"block_size": 4, "halo_size": 1, "stride": 2}),
        ((7, 7), {"block_size": 4, "halo_size": 1, "stride": 2, "avg_down": True}),
        ((3, 5), {"block_size": 4, "halo_size": 0}),
    ],
)
def test_matches_naive_float64(size, cfg):
    ours, _ = _pair(dim=8, num_heads=2, **cfg)
    x = torch.randn(2, 8, *size)
    out32 = ours(x)
    with torch.no_grad():
        out32_inference = ours(x)
    expected = naive_halo(ours, x)
    assert out32.shape == expected.shape
    assert _rel_err(out32.double(), expected) < 1e-5
    assert _rel_err(out32_inference.double(), expected) < 1e-5
    torch.testing.assert_close(ours.double()(x.double()), expected, atol=1e-10, rtol=1e-10)


def test_naive_reference_equals_timm_on_divisible_sizes():
    ours, theirs = _pair(dim=8, num_heads=2, block_size=4, halo_size=2, stride=2)
    x = torch.randn(1, 8, 8, 12)
    expected = theirs(x)
    torch.testing.assert_close(naive_halo(ours, x).float(), expected, atol=1e-5, rtol=0)


def test_gradcheck_float64_non_divisible():
    """Input, relative tables and projections, through the masked non-divisible path."""
    ours, _ = _pair(dim=4, num_heads=2, block_size=3, halo_size=1, qkv_bias=True)
    ours = ours.double()
    names = ["q.weight", "kv.bias", "pos_embed.height_rel", "pos_embed.width_rel"]
    params = dict(ours.named_parameters())
    inputs = (
        torch.randn(1, 4, 4, 5, dtype=torch.float64),
        *(params[n].detach().clone() for n in names),
    )

    def fn(x, *tensors):
        return torch.func.functional_call(ours, dict(zip(names, tensors)), (x,))

    assert torch.autograd.gradcheck(
        fn, tuple(t.requires_grad_(True) for t in inputs), fast_mode=True
    )


def test_torch_compile_aot_eager():
    """Forward and backward on a padded size (masked keys, strided queries)."""
    ours, _ = _pair(dim=8, num_heads=2, block_size=4, halo_size=1, stride=2)
    x = torch.randn(2, 8, 7, 9, requires_grad=True)
    out = torch.compile(ours, backend="aot_eager", fullgraph=True)(x)
    out.sum().backward()
    grad = x.grad.clone()
    x.grad = None
    expected = ours(x)
    expected.sum().backward()
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, x.grad, atol=1e-6, rtol=1e-6)


def test_torch_export_inference():
    ours, _ = _pair(dim=8, num_heads=2, block_size=4, halo_size=1)
    ours.eval()
    x = torch.randn(1, 8, 6, 9)
    with torch.no_grad():
        ep = torch.export.export(ours, (x,))
        torch.testing.assert_close(ep.module()(x), ours(x), atol=1e-6, rtol=1e-6)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        HaloAttention(16, num_heads=3)
    with pytest.raises(ValueError, match="stride"):
        HaloAttention(16, num_heads=2, stride=3)
