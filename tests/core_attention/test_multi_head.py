"""MultiHeadAttention and rotary embedding against a float64 naive reference."""

from __future__ import annotations

import pytest
import torch

import core_attention.layers.multi_head as multi_head_module
from core_attention.layers.multi_head import MultiHeadAttention
from core_attention.layers.rotary import RotaryEmbedding, apply_rotary


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def naive_rotary(x, positions, dim, base=10000.0):
    """Rotate channel pairs as complex numbers: (x0 + i x1) * exp(i * pos * theta)."""
    theta = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angle = positions.double()[..., None] * theta
    if angle.dim() == 3:
        angle = angle[:, None]
    pairs = x[..., :dim].reshape(*x.shape[:-1], dim // 2, 2).contiguous()
    z = torch.view_as_complex(pairs) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([torch.view_as_real(z).flatten(-2), x[..., dim:]], dim=-1)


def naive_norm(t, kind, w, b, eps):
    if kind == "rms":
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w
    mu = t.mean(-1, keepdim=True)
    var = (t - mu).pow(2).mean(-1, keepdim=True)
    return (t - mu) / torch.sqrt(var + eps) * w + b


def naive_mha(
    m,
    x,
    context=None,
    *,
    attn_mask=None,
    key_lengths=None,
    causal=False,
    pos=None,
    ctx_pos=None,
    rope_dim=None,
    qk_norm=None,
    eps=1e-6,
):
    """Explicit softmax(q k^T * scale) v in float64 with the module's weights."""
    w = {k: v.double() for k, v in m.state_dict().items()}

    def lin(t, name):
        out = t @ w[f"{name}.weight"].T
        return out + w[f"{name}.bias"] if f"{name}.bias" in w else out

    x = x.double()
    c = x if context is None else context.double()
    b, n, _ = x.shape
    mlen = c.shape[1]
    h, hkv, d = m.num_heads, m.num_kv_heads, m.head_dim
    q = lin(x, "q_proj").view(b, n, h, d).transpose(1, 2)
    k = lin(c, "k_proj").view(b, mlen, hkv, d).transpose(1, 2)
    v = lin(c, "v_proj").view(b, mlen, hkv, d).transpose(1, 2)
    if qk_norm:
        q = naive_norm(q, qk_norm, w["q_norm.weight"], w.get("q_norm.bias"), eps)
        k = naive_norm(k, qk_norm, w["k_norm.weight"], w.get("k_norm.bias"), eps)
    if pos is not None:
        q = naive_rotary(q, pos, rope_dim)
        k = naive_rotary(k, pos if context is None else ctx_pos, rope_dim)
    k = k.repeat_interleave(h // hkv, dim=1)
    v = v.repeat_interleave(h // hkv, dim=1)
    scores = q @ k.transpose(-1, -2) * m.scale
    allowed = torch.ones(b, h, n, mlen, dtype=torch.bool)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            scores = scores + attn_mask.double()
    if key_lengths is not None:
        allowed = allowed & (torch.arange(mlen) < key_lengths[:, None, None, None])
    if causal:
        allowed = allowed & torch.ones(n, mlen, dtype=torch.bool).tril()
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    out = (probs @ v).transpose(1, 2).reshape(b, n, h * d)
    return lin(out, "out_proj")


SELF_CASES = [
    # heads, kv_heads, qk_norm, qkv_bias, causal, key_lengths
    (4, 4, None, False, False, False),
    (4, 2, "rms", True, True, False),
    (6, 1, "layer", False, False, True),
    (4, 2, None, True, True, True),
]


@pytest.mark.parametrize(
    ("heads", "kv_heads", "qk_norm", "qkv_bias", "causal", "lengths"), SELF_CASES
)
def test_self_attention_matches_naive(heads, kv_heads, qk_norm, qkv_bias, causal, lengths):
    dim, n = 24, 7
    m = MultiHeadAttention(
        dim, heads, num_kv_heads=kv_heads, qk_norm=qk_norm, qkv_bias=qkv_bias
    ).eval()
    if qk_norm:  # non-trivial norm weights
        with torch.no_grad():
            m.q_norm.weight.uniform_(0.5, 1.5)
            m.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, n, dim)
    kl = torch.tensor([7, 3, 1]) if lengths else None
    out = m(x, key_lengths=kl, causal=causal)
    ref = naive_mha(m, x, key_lengths=kl, causal=causal, qk_norm=qk_norm)
    assert out.shape == (3, n, dim)
    assert rel_err(out, ref) < 1e-5


def test_cross_attention_with_masks_matches_naive():
    dim, ctx_dim, n, mlen = 20, 11, 5, 9
    m = MultiHeadAttention(dim, 4, num_kv_heads=2, head_dim=6, context_dim=ctx_dim).eval()
    x, ctx = torch.randn(2, n, dim), torch.randn(2, mlen, ctx_dim)
    bool_mask = torch.rand(2, 1, n, mlen) > 0.3
    bool_mask[1, 0, 2] = False  # a query row with no key returns zeros from the attention
    kl = torch.tensor([9, 4])
    out = m(x, ctx, attn_mask=bool_mask, key_lengths=kl)
    ref = naive_mha(m, x, ctx, attn_mask=bool_mask, key_lengths=kl)
    assert rel_err(out, ref) < 1e-5
    additive = torch.randn(n, mlen)
    out = m(x, ctx, attn_mask=additive)
    assert rel_err(out, naive_mha(m, x, ctx, attn_mask=additive)) < 1e-5


def test_rotary_self_and_cross_match_naive():
    dim, heads, n, mlen = 32, 4, 6, 5
    rotary = RotaryEmbedding(6)  # partial: 6 of 8 channels per head rotate
    m = MultiHeadAttention(dim, heads, num_kv_heads=2, qk_norm="rms").eval()
    x, ctx = torch.randn(2, n, dim), torch.randn(2, mlen, dim)
    pos = torch.tensor([[0.0, 1, 2, 3, 4, 5], [3, 3, 4, 4, 7, 9]])  # per item, repeated frames
    ctx_pos = torch.arange(mlen)
    out = m(x, rope=rotary(pos), causal=True)
    ref = naive_mha(m, x, pos=pos, rope_dim=6, causal=True, qk_norm="rms")
    assert rel_err(out, ref) < 1e-5
    out = m(x, ctx, rope=rotary(pos), rope_context=rotary(ctx_pos))
    ref = naive_mha(m, x, ctx, pos=pos, ctx_pos=ctx_pos, rope_dim=6, qk_norm="rms")
    assert rel_err(out, ref) < 1e-5


def test_rotary_depends_on_relative_positions_only():
    m = MultiHeadAttention(16, 2).eval()
    rotary = RotaryEmbedding(8)
    x = torch.randn(1, 5, 16)
    pos = torch.arange(5)
    a = m(x, rope=rotary(pos))
    b = m(x, rope=rotary(pos + 37))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    c = m(x, rope=rotary(pos.flip(0)))
    assert not torch.allclose(a, c, atol=1e-3)


def test_apply_rotary_matches_complex_rotation():
    x = torch.randn(2, 3, 7, 10, dtype=torch.float64)
    rotary = RotaryEmbedding(10, base=500.0).double()
    pos = torch.randn(2, 7) * 20
    out = apply_rotary(x, *rotary(pos))
    ref = naive_rotary(x, pos, 10, base=500.0)
    # the frequencies are float32 tables (as in every RoPE), angles up to ~60 rad
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # multi-axis tables concatenate: (t, h) axes of 4 + 6 channels
    pt, ph = torch.arange(7), torch.arange(7) % 3
    ct, st = RotaryEmbedding(4).double()(pt)
    ch, sh = RotaryEmbedding(6).double()(ph)
    out = apply_rotary(x, torch.cat([ct, ch], -1), torch.cat([st, sh], -1))
    ref = torch.cat([naive_rotary(x[..., :4], pt, 4), naive_rotary(x[..., 4:], ph, 6)], -1)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_rotary_errors():
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(5)
    x = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="positions"):
        apply_rotary(x, *RotaryEmbedding(8)(torch.arange(3)))
    with pytest.raises(ValueError, match="head dim"):
        apply_rotary(x, *RotaryEmbedding(10)(torch.arange(4)))
    m = MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match="rope_context"):
        m(torch.randn(1, 4, 8), torch.randn(1, 3, 8), rope=RotaryEmbedding(4)(torch.arange(4)))
    with pytest.raises(ValueError, match="multiple"):
        MultiHeadAttention(12, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="qk_norm"):
        MultiHeadAttention(8, 2, qk_norm="batch")


def test_gradcheck_self_and_cross():
    m = MultiHeadAttention(8, 2, num_kv_heads=1, qk_norm="layer", qkv_bias=True).double()
    rotary = RotaryEmbedding(4).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    kl = torch.tensor([5, 2])
    rope = rotary(torch.arange(5))
    assert torch.autograd.gradcheck(lambda t: m(t, key_lengths=kl, causal=True, rope=rope), (x,))
    mask = torch.tensor([[True, False, True]])
    assert torch.autograd.gradcheck(lambda t, c: m(t, c, attn_mask=mask), (x, ctx))
    rms = MultiHeadAttention(8, 2, qk_norm="rms", head_dim=3).double()
    additive = torch.randn(5, 3, dtype=torch.float64)
    rope_ctx = RotaryEmbedding(2).double()(torch.arange(3))
    rope_q = RotaryEmbedding(2).double()(torch.arange(5))
    assert torch.autograd.gradcheck(
        lambda t, c: rms(t, c, attn_mask=additive, rope=rope_q, rope_context=rope_ctx),
        (x, ctx),
    )


def test_dropout_only_in_training():
    m = MultiHeadAttention(16, 2, attn_drop=0.5, proj_drop=0.5)
    x = torch.randn(2, 9, 16)
    m.eval()
    assert rel_err(m(x), naive_mha(m, x)) < 1e-5
    m.train()
    assert not torch.allclose(m(x), m(x))


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_backend_is_passed_on(monkeypatch, backend):
    seen = []
    real = multi_head_module.attention

    def spy(*args, **kwargs):
        seen.append(kwargs["backend"])
        return real(*args, **kwargs)

    monkeypatch.setattr(multi_head_module, "attention", spy)
    MultiHeadAttention(8, 2, backend=backend)(torch.randn(1, 3, 8))
    assert seen == [backend]


def test_compile_and_export():
    m = MultiHeadAttention(16, 4, num_kv_heads=2, qk_norm="rms").eval()
    rotary = RotaryEmbedding(4)
    x, ctx = torch.randn(2, 7, 16), torch.randn(2, 5, 16)
    kl = torch.tensor([5, 3])
    rope = rotary(torch.arange(7))

    def call(mod):
        return mod(x, key_lengths=torch.tensor([7, 4]), causal=True, rope=rope), mod(
            x, ctx, key_lengths=kl
        )

    expected = call(m)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    for got, want in zip(call(compiled), expected):
        torch.testing.assert_close(got, want)

    exported = torch.export.export(m, (x, ctx), {"key_lengths": kl}).module()
    torch.testing.assert_close(exported(x, ctx, key_lengths=kl), expected[1])


@pytest.mark.slow
def test_inductor_compile_matches_eager():
    m = MultiHeadAttention(16, 4, num_kv_heads=2, qk_norm="rms").eval()
    x = torch.randn(2, 7, 16)
    kl = torch.tensor([7, 4])
    compiled = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(compiled(x, key_lengths=kl), m(x, key_lengths=kl))
