"""core_attention.attention (torch backend) against a float64 naive implementation."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import core_attention
from core_attention import BackendUnavailableError, attention
from core_attention import functional as fa


def naive_attention(q, k, v, attn_mask=None, causal=False, scale=None, key_lengths=None):
    """softmax(q k^T * scale + mask) v in float64 with every mask built by hand."""
    q, k, v = q.double(), k.double(), v.double()
    b, h, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    group = h // hk
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = d**-0.5 if scale is None else scale
    logits = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    allowed = torch.ones(b, h, nq, nk, dtype=torch.bool)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask.expand(b, h, nq, nk)
        else:
            logits = logits + attn_mask.double().expand(b, h, nq, nk)
    if causal:
        for i in range(nq):
            allowed[:, :, i, i + 1 :] = False
    if key_lengths is not None:
        for bi, length in enumerate(key_lengths.tolist()):
            allowed[bi, :, :, length:] = False
    logits = logits.masked_fill(~allowed, float("-inf"))
    out = torch.zeros(b, h, nq, v.shape[-1], dtype=torch.float64)
    for idx in itertools.product(range(b), range(h), range(nq)):
        row = logits[idx]
        if torch.isinf(row).all():
            continue  # no admissible key: zeros
        p = torch.exp(row - row.max())
        out[idx] = (p / p.sum()) @ v[idx[0], idx[1]]
    return out


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))


def make_qkv(b, h, hk, nq, nk, d, dv=None, dtype=torch.float32, grad=False):
    q = torch.randn(b, h, nq, d, dtype=dtype, requires_grad=grad)
    k = torch.randn(b, hk, nk, d, dtype=dtype, requires_grad=grad)
    v = torch.randn(b, hk, nk, dv or d, dtype=dtype, requires_grad=grad)
    return q, k, v


CASES = [
    # b, h, hk, nq, nk, d
    (2, 4, 4, 17, 17, 16),  # odd length
    (1, 6, 2, 1, 1, 8),  # N = 1, GQA
    (3, 8, 1, 33, 65, 32),  # MQA, cross attention Nq < Nk
    (2, 2, 2, 29, 7, 24),  # cross attention Nq > Nk
]


@pytest.mark.parametrize(("b", "h", "hk", "nq", "nk", "d"), CASES)
@pytest.mark.parametrize("causal", [False, True])
def test_matches_naive(b, h, hk, nq, nk, d, causal):
    q, k, v = make_qkv(b, h, hk, nq, nk, d)
    out = attention(q, k, v, causal=causal, backend="torch")
    assert out.shape == (b, h, nq, d)
    assert rel_err(out, naive_attention(q, k, v, causal=causal)) < 1e-5


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_key_lengths(causal, with_mask):
    b, h, nq, nk, d = 4, 3, 13, 19, 8
    q, k, v = make_qkv(b, h, h, nq, nk, d)
    lengths = torch.tensor([19, 5, 1, 12])
    mask = torch.rand(b, 1, nq, nk) > 0.3 if with_mask else None
    out = attention(q, k, v, key_lengths=lengths, causal=causal, attn_mask=mask)
    ref = naive_attention(q, k, v, attn_mask=mask, causal=causal, key_lengths=lengths)
    assert rel_err(out, ref) < 1e-5
    # Padded keys have no influence at all.
    k2, v2 = k.clone(), v.clone()
    for bi, length in enumerate(lengths.tolist()):
        k2[bi, :, length:] = torch.randn_like(k2[bi, :, length:]) * 100
        v2[bi, :, length:] = torch.randn_like(v2[bi, :, length:]) * 100
    out2 = attention(q, k2, v2, key_lengths=lengths, causal=causal, attn_mask=mask)
    torch.testing.assert_close(out, out2, rtol=0, atol=1e-6)


def test_key_lengths_never_builds_a_dense_mask(monkeypatch):
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(None if attn_mask is None else tuple(attn_mask.shape))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(fa.F, "scaled_dot_product_attention", spy)
    q, k, v = make_qkv(2, 2, 2, 64, 64, 8)
    lengths = torch.tensor([64, 30])
    for causal in (False, True):
        attention(q, k, v, key_lengths=lengths, causal=causal)
    assert seen, "SDPA was not called"
    for shape in seen:
        assert shape is None or shape[-2] == 1, f"dense mask {shape} built"


def test_zero_length_and_fully_masked_rows_give_zeros():
    q, k, v = make_qkv(2, 2, 2, 5, 6, 4)
    out = attention(q, k, v, key_lengths=torch.tensor([0, 6]))
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isfinite(out).all()
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[2] = False
    out = attention(q, k, v, attn_mask=mask)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    additive = torch.zeros(5, 6).masked_fill(~mask, float("-inf"))
    out_add = attention(q, k, v, attn_mask=additive)
    torch.testing.assert_close(out_add, out)


@pytest.mark.parametrize("mask_shape", [(1, 1, 11, 9), (2, 1, 11, 9), (11, 9), (2, 4, 1, 9)])
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_broadcast_masks(mask_shape, kind):
    q, k, v = make_qkv(2, 4, 2, 11, 9, 8)
    if kind == "bool":
        mask = torch.rand(mask_shape) > 0.4
    else:
        mask = torch.randn(mask_shape) * 2
    for causal in (False, True):
        out = attention(q, k, v, attn_mask=mask, causal=causal)
        assert rel_err(out, naive_attention(q, k, v, attn_mask=mask, causal=causal)) < 1e-5


def test_scale_and_value_head_dim():
    q, k, v = make_qkv(1, 2, 2, 7, 10, 12, dv=5)
    out = attention(q, k, v, scale=0.37)
    assert out.shape == (1, 2, 7, 5)
    assert rel_err(out, naive_attention(q, k, v, scale=0.37)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    q, k, v = make_qkv(2, 4, 2, 31, 31, 16, dtype=dtype)
    out = attention(q, k, v, causal=True, key_lengths=torch.tensor([31, 20]))
    assert out.dtype == dtype
    ref = naive_attention(q, k, v, causal=True, key_lengths=torch.tensor([31, 20]))
    assert rel_err(out, ref) < (1e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"causal": True},
        {"key_lengths": torch.tensor([3, 6])},
        {"key_lengths": torch.tensor([3, 6]), "causal": True},
        {"attn_mask": torch.randn(2, 1, 5, 6, dtype=torch.float64)},
    ],
)
def test_gradcheck(kw):
    q, k, v = make_qkv(2, 4, 2, 5, 6, 3, dtype=torch.float64, grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, **kw), (q, k, v))


def test_gradients_match_naive():
    q, k, v = make_qkv(2, 4, 2, 9, 13, 8, grad=True)
    lengths = torch.tensor([13, 4])
    attention(q, k, v, causal=True, key_lengths=lengths).square().sum().backward()
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    naive_attention(q2, k2, v2, causal=True, key_lengths=lengths).square().sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        assert rel_err(a.grad, b.grad) < 1e-5


def test_dropout_only_changes_output_when_asked():
    q, k, v = make_qkv(1, 2, 2, 16, 16, 8)
    ref = attention(q, k, v)
    torch.testing.assert_close(attention(q, k, v, dropout_p=0.0), ref)
    assert not torch.allclose(attention(q, k, v, dropout_p=0.5), ref)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"q": torch.randn(2, 3, 4)}, ValueError, "must be \\[B, H, N, D\\]"),
        ({"k": torch.randn(1, 3, 5, 8), "v": torch.randn(1, 3, 5, 8)}, ValueError, "multiple"),
        ({"k": torch.randn(1, 4, 5, 7)}, ValueError, "head dims differ"),
        ({"attn_mask": torch.ones(3, 3, dtype=torch.bool)}, ValueError, "does not broadcast"),
        ({"key_lengths": torch.tensor([1.0])}, ValueError, "key_lengths"),
        ({"backend": "cuda"}, ValueError, "backend must be one of"),
    ],
)
def test_bad_input_errors(kwargs, error, match):
    args = {
        "q": torch.randn(1, 4, 5, 8),
        "k": torch.randn(1, 4, 5, 8),
        "v": torch.randn(1, 4, 5, 8),
    }
    args.update(kwargs)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(error, match=match):
        attention(q, k, v, **args)


def test_triton_backend_error_names_the_reason(monkeypatch):
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8)
    monkeypatch.setattr(fa, "triton_unsupported_reason", lambda *a, **kw: "dropout is unsupported")
    with pytest.raises(BackendUnavailableError, match="dropout is unsupported"):
        attention(q, k, v, backend="triton")
    # auto falls back to torch with the same result.
    torch.testing.assert_close(
        attention(q, k, v, backend="auto"), attention(q, k, v, backend="torch")
    )


def test_env_override(monkeypatch):
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8)
    monkeypatch.setattr(fa, "triton_unsupported_reason", lambda *a, **kw: "not here")
    monkeypatch.setenv("CORE_ATTENTION_BACKEND", "triton")
    with pytest.raises(BackendUnavailableError, match="not here"):
        attention(q, k, v)
    # An explicit backend in code stays as written.
    attention(q, k, v, backend="torch")
    monkeypatch.setenv("CORE_ATTENTION_BACKEND", "bogus")
    with pytest.raises(ValueError, match="CORE_ATTENTION_BACKEND"):
        attention(q, k, v)


def test_compiles_without_graph_breaks():
    def f(q, k, v, lengths):
        return core_attention.attention(q, k, v, causal=True, key_lengths=lengths, backend="torch")

    q, k, v = make_qkv(2, 2, 1, 9, 9, 8)
    lengths = torch.tensor([9, 4])
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, lengths), f(q, k, v, lengths))


def test_compiles_with_dynamic_shapes():
    def f(q, k, v):
        return core_attention.attention(q, k, v, causal=True, backend="torch")

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    for h, hk, n in ((4, 2, 9), (6, 3, 13), (4, 4, 5)):
        q, k, v = make_qkv(2, h, hk, n, n, 8)
        torch.testing.assert_close(compiled(q, k, v), f(q, k, v))
