"""MultiConditionCrossAttention against a float64 naive reference."""

from __future__ import annotations

import pytest
import torch

import core_attention.layers.multi_condition as multi_condition_module
from core_attention.layers.multi_condition import MultiConditionCrossAttention


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def naive_multi_condition(m, x, conditions, key_lengths=None, attn_masks=None, scales=None):
    """out_proj(sum_c s_c softmax(q k_c^T * scale) v_c), masks by hand, float64."""
    w = {k: v.double() for k, v in m.state_dict().items()}
    key_lengths, attn_masks = key_lengths or {}, attn_masks or {}
    scales = {**dict.fromkeys(m.condition_names, 1.0), **m.scales, **(scales or {})}

    def lin(t, name):
        out = t @ w[f"{name}.weight"].T
        return out + w[f"{name}.bias"] if f"{name}.bias" in w else out

    x = x.double()
    b, n, _ = x.shape
    h, hkv, d = m.num_heads, m.num_kv_heads, m.head_dim
    q = lin(x, "q_proj").view(b, n, h, d).transpose(1, 2)
    total = torch.zeros(b, h, n, d, dtype=torch.float64)
    for name, c in conditions.items():
        if c is None:
            continue
        c = c.double()
        mlen = c.shape[1]
        k = lin(c, f"k_proj.{name}").view(b, mlen, hkv, d).transpose(1, 2)
        v = lin(c, f"v_proj.{name}").view(b, mlen, hkv, d).transpose(1, 2)
        k, v = k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1)
        scores = q @ k.transpose(-1, -2) / d**0.5
        allowed = torch.ones(b, h, n, mlen, dtype=torch.bool)
        if key_lengths.get(name) is not None:
            allowed &= torch.arange(mlen) < key_lengths[name][:, None, None, None]
        if attn_masks.get(name) is not None:
            allowed &= attn_masks[name]
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        total += scales[name] * torch.nan_to_num(probs, nan=0.0) @ v
    return lin(total.transpose(1, 2).reshape(b, n, h * d), "out_proj")


def make_module(**kwargs):
    kwargs.setdefault("num_heads", 4)
    return MultiConditionCrossAttention(
        24, {"text": 10, "image": 14}, qkv_bias=True, **kwargs
    ).eval()


def test_text_and_image_match_naive():
    m = make_module(num_kv_heads=2, scales={"image": 0.6})
    x = torch.randn(3, 7, 24)
    conditions = {"text": torch.randn(3, 5, 10), "image": torch.randn(3, 9, 14)}
    key_lengths = {"text": torch.tensor([5, 2, 1])}
    attn_masks = {"image": torch.rand(3, 1, 7, 9) > 0.4}
    out = m(x, conditions, key_lengths=key_lengths, attn_masks=attn_masks)
    ref = naive_multi_condition(m, x, conditions, key_lengths, attn_masks)
    assert out.shape == (3, 7, 24)
    assert rel_err(out, ref) < 1e-5
    scales = {"text": 2.0, "image": -0.5}
    out = m(x, conditions, key_lengths=key_lengths, scales=scales)
    assert rel_err(out, naive_multi_condition(m, x, conditions, key_lengths, scales=scales)) < 1e-5


def test_absent_conditions():
    m = make_module()
    x = torch.randn(2, 6, 24)
    text, image = torch.randn(2, 4, 10), torch.randn(2, 3, 14)
    text_only = m(x, {"text": text, "image": None})
    assert rel_err(text_only, naive_multi_condition(m, x, {"text": text})) < 1e-5
    torch.testing.assert_close(m(x, {"text": text}), text_only)
    # an absent condition equals one whose tokens are all masked out
    masked = m(x, {"text": text, "image": image}, key_lengths={"image": torch.tensor([0, 0])})
    torch.testing.assert_close(masked, text_only)
    unconditional = m(x, {"text": None, "image": None})
    torch.testing.assert_close(unconditional, m.out_proj.bias.expand(2, 6, 24))
    assert rel_err(m(x, {"image": image}), naive_multi_condition(m, x, {"image": image})) < 1e-5


def test_init_condition_from():
    m = MultiConditionCrossAttention(16, {"text": 12, "image": 12, "audio": 5}, 2, qkv_bias=True)
    m.init_condition_from("image", "text")
    for proj in (m.k_proj, m.v_proj):
        torch.testing.assert_close(proj["image"].weight, proj["text"].weight)
        torch.testing.assert_close(proj["image"].bias, proj["text"].bias)
    x, c = torch.randn(2, 5, 16), torch.randn(2, 3, 12)
    both = m(x, {"text": c, "image": c})
    doubled = m(x, {"text": c}, scales={"text": 2.0})
    torch.testing.assert_close(both, doubled)
    with pytest.raises(ValueError, match="condition dims differ"):
        m.init_condition_from("audio", "text")
    with pytest.raises(ValueError, match="unknown"):
        m.init_condition_from("video", "text")


def test_errors():
    m = make_module()
    x = torch.randn(1, 3, 24)
    with pytest.raises(ValueError, match="unknown"):
        m(x, {"txt": torch.randn(1, 2, 10)})
    with pytest.raises(ValueError, match="unknown"):
        m(x, {"text": torch.randn(1, 2, 10)}, key_lengths={"video": torch.tensor([1])})
    with pytest.raises(ValueError, match="at least one"):
        MultiConditionCrossAttention(8, {})


def test_gradcheck():
    m = MultiConditionCrossAttention(4, {"text": 3, "image": 2}, 2, num_kv_heads=1).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    text = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    image = torch.randn(2, 2, 2, dtype=torch.float64, requires_grad=True)
    lengths = {"text": torch.tensor([4, 1])}
    masks = {"image": torch.tensor([[True, False], [False, True], [True, True]])}
    assert torch.autograd.gradcheck(
        lambda a, t, i: m(a, {"text": t, "image": i}, key_lengths=lengths, attn_masks=masks),
        (x, text, image),
    )
    assert torch.autograd.gradcheck(lambda a, t: m(a, {"text": t}), (x[:1], text[:1]))


def test_dropout_only_in_training():
    m = make_module(attn_drop=0.5)
    x, c = torch.randn(2, 6, 24), {"text": torch.randn(2, 8, 10)}
    assert rel_err(m(x, c), naive_multi_condition(m, x, c)) < 1e-5
    m.train()
    assert not torch.allclose(m(x, c), m(x, c))


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_backend_is_passed_on(monkeypatch, backend):
    seen = []
    real = multi_condition_module.attention

    def spy(*args, **kwargs):
        seen.append(kwargs["backend"])
        return real(*args, **kwargs)

    monkeypatch.setattr(multi_condition_module, "attention", spy)
    m = MultiConditionCrossAttention(8, {"text": 4, "image": 4}, 2, backend=backend)
    m(torch.randn(1, 3, 8), {"text": torch.randn(1, 2, 4), "image": torch.randn(1, 5, 4)})
    assert seen == [backend, backend]


def test_compile_and_export():
    m = make_module(num_kv_heads=2)
    x = torch.randn(2, 7, 24)
    text, image = torch.randn(2, 5, 10), torch.randn(2, 3, 14)
    lengths = {"text": torch.tensor([5, 2])}
    expected_both = m(x, {"text": text, "image": image}, key_lengths=lengths)
    expected_text = m(x, {"text": text, "image": None}, key_lengths=lengths)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    got = compiled(x, {"text": text, "image": image}, key_lengths=lengths)
    torch.testing.assert_close(got, expected_both)
    got = compiled(x, {"text": text, "image": None}, key_lengths=lengths)
    torch.testing.assert_close(got, expected_text)
    exported = torch.export.export(
        m, (x, {"text": text, "image": image}), {"key_lengths": lengths}
    ).module()
    got = exported(x, {"text": text, "image": image}, key_lengths=lengths)
    torch.testing.assert_close(got, expected_both)
