"""The compiled small-head CPU attention kernel against float64 naive attention, and its
routing inside core_attention.attention."""

from __future__ import annotations

import pytest
import torch

from core_attention import attention, cpu_attention
from core_attention.layers.multi_head import MultiHeadAttention
from core_attention.layers.time_frequency import TimeFrequencyAttention

pytestmark = pytest.mark.skipif(
    not cpu_attention.available(), reason=f"kernel did not build: {cpu_attention.build_error()}"
)


def naive(q, k, v, scale, key_lengths=None):
    """softmax(q k^T * scale) v in float64, one row at a time; keyless rows are zero."""
    q, k, v = q.double(), k.double(), v.double()
    b, h, nq, _ = q.shape
    group = h // k.shape[1]
    out = torch.zeros(b, h, nq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        n = k.shape[2] if key_lengths is None else min(int(key_lengths[bi]), k.shape[2])
        if n <= 0:
            continue
        for hi in range(h):
            kk, vv = k[bi, hi // group, :n], v[bi, hi // group, :n]
            for i in range(nq):
                w = torch.softmax((kk @ q[bi, hi, i]) * scale, dim=0)
                out[bi, hi, i] = w @ vv
    return out


def projected(b, n, heads, d, dtype, gen):
    """q, k, v as views of one [B, N, 3, H, D] projection output (strided, as in a layer)."""
    x = torch.randn(b, n, 3, heads, d, dtype=dtype, generator=gen)
    return (t.transpose(1, 2) for t in x.unbind(2))


CASES = [  # b, heads, kv heads, nq, nk, d, dv
    (2, 3, 3, 37, 53, 8, 8),
    (1, 4, 2, 5, 200, 16, 16),
    (3, 2, 1, 70, 15, 3, 5),
    (2, 8, 8, 1, 1, 8, 8),
    (1, 1, 1, 130, 33, 1, 16),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("lengths", [False, True])
def test_matches_float64_naive(case, lengths):
    b, h, hk, nq, nk, d, dv = case
    gen = torch.Generator().manual_seed(sum(case) + lengths)
    q = torch.randn(b, h, nq, d, dtype=torch.float64, generator=gen)
    k = torch.randn(b, hk, nk, d, dtype=torch.float64, generator=gen) * 2
    v = torch.randn(b, hk, nk, dv, dtype=torch.float64, generator=gen)
    key_lengths = torch.randint(0, nk + 2, (b,), generator=gen) if lengths else None
    if lengths:
        key_lengths[0] = 0  # an item without keys: zero rows
    scale = 0.37
    ref = naive(q, k, v, scale, key_lengths)
    out = cpu_attention.small_head_attention(q, k, v, scale, key_lengths)
    assert out.shape == (b, h, nq, dv)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out32 = cpu_attention.small_head_attention(q.float(), k.float(), v.float(), scale, key_lengths)
    torch.testing.assert_close(out32.double(), ref, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("threads", [1, 2])
def test_strided_projection_views_and_threads(threads):
    gen = torch.Generator().manual_seed(7)
    q, k, v = projected(5, 97, 8, 8, torch.float32, gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = cpu_attention.small_head_attention(q, k, v, 8**-0.5)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out.double(), naive(q, k, v, 8**-0.5), rtol=1e-5, atol=2e-6)
    # the [B, N, H, Dv] layout: merging heads is a view
    merged = out.transpose(1, 2).reshape(5, 97, 64)
    assert merged.data_ptr() == out.data_ptr()


def test_unsupported_cases_are_named():
    q = torch.randn(1, 2, 4, 8)
    assert cpu_attention.unsupported_reason(q, q, q) is None
    assert "mask" in cpu_attention.unsupported_reason(q, q, q, causal=True)
    assert "mask" in cpu_attention.unsupported_reason(
        q, q, q, attn_mask=torch.ones(4, 4, dtype=torch.bool)
    )
    assert "dropout" in cpu_attention.unsupported_reason(q, q, q, dropout_p=0.1)
    big = torch.randn(1, 2, 4, 32)
    assert "head size" in cpu_attention.unsupported_reason(big, big, big)
    assert "bfloat16" in cpu_attention.unsupported_reason(*(q.bfloat16(),) * 3)
    g = q.clone().requires_grad_()
    assert "gradients" in cpu_attention.unsupported_reason(g, q, q)
    with torch.no_grad():
        assert cpu_attention.unsupported_reason(g, q, q) is None
    with pytest.raises(RuntimeError, match=r"cannot run: gradients"):
        cpu_attention.small_head_attention(g, q, q, 1.0)


def _spy(monkeypatch):
    calls = []
    real = cpu_attention.small_head_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(cpu_attention, "small_head_attention", spy)
    return calls


def test_auto_routes_cpu_inference_to_the_kernel(monkeypatch):
    calls = _spy(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    q, k, v = projected(2, 41, 4, 8, torch.float32, gen)
    lengths = torch.tensor([41, 17])
    with torch.no_grad():
        out = attention(q, k, v, key_lengths=lengths)
        assert len(calls) == 1
        ref = attention(q, k, v, key_lengths=lengths, backend="torch")
        assert len(calls) == 1  # an explicit torch backend stays on PyTorch
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("CORE_ATTENTION_BACKEND", "torch")
    with torch.no_grad():
        attention(q, k, v)
    assert len(calls) == 1


def test_training_keeps_the_differentiable_path(monkeypatch):
    calls = _spy(monkeypatch)
    q = torch.randn(1, 2, 9, 8, dtype=torch.float64, requires_grad=True)
    out = attention(q, q, q)
    assert not calls
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_time_frequency_attention_same_with_either_path(monkeypatch):
    torch.manual_seed(0)
    layer = TimeFrequencyAttention(32, num_heads=4).eval()
    x = torch.randn(2, 32, 23, 11)
    calls = _spy(monkeypatch)
    with torch.no_grad():
        for axis in ("time", "freq"):
            fast = layer(x, axis)
            layer.attn.backend = "torch"
            ref = layer(x, axis)
            layer.attn.backend = "auto"
            torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2


def test_multi_head_layer_with_padding():
    torch.manual_seed(1)
    mha = MultiHeadAttention(48, 6, qkv_bias=True).eval()  # head size 8
    x = torch.randn(3, 29, 48)
    lengths = torch.tensor([29, 1, 12])
    with torch.no_grad():
        fast = mha(x, key_lengths=lengths)
        mha.backend = "torch"
        ref = mha(x, key_lengths=lengths)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_traced_and_exported_graphs_keep_the_attention():
    """Tracers record PyTorch's attention, never the kernel (which they could not see)."""
    torch.manual_seed(2)
    mha = MultiHeadAttention(32, 4).eval()  # head size 8
    x, other = torch.randn(2, 19, 32), torch.randn(3, 11, 32)
    with torch.no_grad():
        traced = torch.jit.trace(mha, (x,), check_trace=False)
        torch.testing.assert_close(traced(other), mha(other), rtol=1e-5, atol=1e-5)
        exported = torch.export.export(mha, (x,)).module()
        torch.testing.assert_close(exported(x), mha(x), rtol=1e-5, atol=1e-5)
