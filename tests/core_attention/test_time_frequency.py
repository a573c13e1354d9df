"""TimeFrequencyAttention against a float64 naive reference."""

from __future__ import annotations

import pytest
import torch

import core_attention.layers.multi_head as multi_head_module
from core_attention.layers.time_frequency import TimeFrequencyAttention


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def naive_sequence_attention(w, seq, norm, heads, valid):
    """x + MHA(LN(x)) for one sequence [L, C], keys limited to the first ``valid``."""
    c = seq.shape[1]
    mu = seq.mean(-1, keepdim=True)
    var = (seq - mu).pow(2).mean(-1, keepdim=True)
    y = (seq - mu) / torch.sqrt(var + 1e-5) * w[f"{norm}.weight"] + w[f"{norm}.bias"]
    q, k, v = (y @ w[f"attn.{p}_proj.weight"].T + w[f"attn.{p}_proj.bias"] for p in "qkv")
    d = c // heads
    out = torch.empty_like(q)
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        scores = q[:, cols] @ k[:valid, cols].T / d**0.5
        out[:, cols] = torch.softmax(scores, dim=-1) @ v[:valid, cols]
    return out @ w["attn.out_proj.weight"].T + w["attn.out_proj.bias"]


def naive_tf(m, x, axis, heads, key_lengths=None, residual=True):
    w = {k: v.double() for k, v in m.state_dict().items()}
    x = x.double()
    b, _, t, f = x.shape
    out = torch.empty_like(x)
    for i in range(b):
        if axis == "time":
            valid = t if key_lengths is None else int(key_lengths[i])
            for j in range(f):
                seq = x[i, :, :, j].T
                res = naive_sequence_attention(w, seq, "norm_time", heads, valid)
                out[i, :, :, j] = (res + seq if residual else res).T
        else:
            for j in range(t):
                seq = x[i, :, j, :].T
                res = naive_sequence_attention(w, seq, "norm_freq", heads, f)
                out[i, :, j, :] = (res + seq if residual else res).T
    return out


def make_module(**kwargs):
    m = TimeFrequencyAttention(12, 3, **kwargs).eval()
    with torch.no_grad():
        for norm in (m.norm_time, m.norm_freq):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
    return m


@pytest.mark.parametrize("axis", ["time", "freq"])
@pytest.mark.parametrize("residual", [True, False])
def test_matches_naive(axis, residual):
    m = make_module(residual=residual)
    x = torch.randn(2, 12, 7, 5)
    out = m(x, axis)
    assert out.shape == x.shape
    assert rel_err(out, naive_tf(m, x, axis, 3, residual=residual)) < 1e-5


def test_weights_are_shared_between_axes():
    m = make_module()
    names = {name.split(".")[0] for name, _ in m.named_parameters()}
    assert names == {"norm_time", "norm_freq", "attn"}
    x = torch.randn(1, 12, 4, 4)
    before = (m(x, "time"), m(x, "freq"))
    with torch.no_grad():
        m.attn.v_proj.weight.mul_(2.0)
    after = (m(x, "time"), m(x, "freq"))
    for a, b in zip(before, after):
        assert not torch.allclose(a, b)


def test_time_key_lengths():
    m = make_module()
    x = torch.randn(3, 12, 9, 4)
    key_lengths = torch.tensor([9, 4, 1])
    out = m(x, "time", key_lengths)
    assert rel_err(out, naive_tf(m, x, "time", 3, key_lengths)) < 1e-5
    y = x.clone()
    y[1, :, 4:] = torch.randn(12, 5, 4) * 30
    y[2, :, 1:] = torch.randn(12, 8, 4) * 30
    again = m(y, "time", key_lengths)
    torch.testing.assert_close(again[1, :, :4], out[1, :, :4])
    torch.testing.assert_close(again[2, :, :1], out[2, :, :1])
    # frequency attention mixes bins of one frame only: valid frames are untouched by padding
    torch.testing.assert_close(m(y, "freq", key_lengths)[1, :, :4], m(x, "freq")[1, :, :4])


@pytest.mark.parametrize("axis", ["time", "freq"])
def test_gradcheck(axis):
    m = TimeFrequencyAttention(4, 2).double().eval()
    x = torch.randn(2, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    key_lengths = torch.tensor([3, 2]) if axis == "time" else None
    assert torch.autograd.gradcheck(lambda t: m(t, axis, key_lengths), (x,))


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_backend_is_passed_on(monkeypatch, backend):
    seen = []
    real = multi_head_module.attention

    def spy(*args, **kwargs):
        seen.append(kwargs["backend"])
        return real(*args, **kwargs)

    monkeypatch.setattr(multi_head_module, "attention", spy)
    m = TimeFrequencyAttention(8, 2, backend=backend)
    x = torch.randn(1, 8, 3, 5)
    m(m(x, "time"), "freq")
    assert seen == [backend, backend]


def test_compile_and_export():
    m = make_module()
    x = torch.randn(2, 12, 7, 5)
    key_lengths = torch.tensor([7, 3])
    expected = (m(x, "time", key_lengths), m(x, "freq"))
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, "time", key_lengths), expected[0])
    torch.testing.assert_close(compiled(x, "freq"), expected[1])
    exported = torch.export.export(m, (x, "time", key_lengths)).module()
    torch.testing.assert_close(exported(x, "time", key_lengths), expected[0])
    exported = torch.export.export(m, (x, "freq")).module()
    torch.testing.assert_close(exported(x, "freq"), expected[1])


def test_errors():
    m = make_module()
    with pytest.raises(ValueError, match="axis"):
        m(torch.randn(1, 12, 3, 3), "channel")
    with pytest.raises(ValueError, match="key_lengths"):
        m(torch.randn(2, 12, 3, 3), "time", torch.tensor([3]))
    with pytest.raises(ValueError, match=r"\[B, C, T, F\]"):
        m(torch.randn(12, 3, 3), "time")
