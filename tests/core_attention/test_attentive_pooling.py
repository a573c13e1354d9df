"""AttentiveStatisticsPooling against SpeechBrain's and a float64 naive reference."""

from __future__ import annotations

import pytest
import torch
from speechbrain.lobes.models.ECAPA_TDNN import AttentiveStatisticsPooling as SBPooling

import core_attention.layers.attentive_pooling as pooling_module
from core_attention.layers.attentive_pooling import AttentiveStatisticsPooling


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def randomise_norm_stats(module):
    with torch.no_grad():
        norm = module.tdnn.norm.norm
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()


def naive_pooling(m, x, lengths):
    """Per item: valid frames t < lengths * T, eval-mode scoring network written out,
    explicit softmax over the valid frames, weighted mean and std, all in float64."""
    w = {k: v.double() for k, v in m.state_dict().items()}
    x = x.double()
    b, c, t = x.shape
    outs = []
    for i in range(b):
        valid = [f for f in range(t) if lengths is None or f < float(lengths[i]) * t]
        xi = x[i][:, valid]  # [C, T_i]
        if m.global_context:
            mu = xi.mean(dim=1, keepdim=True)
            sd = (xi - mu).pow(2).mean(dim=1, keepdim=True).clamp(min=1e-12).sqrt()
            # the scoring input of every frame, padded ones included, carries these stats
            full = torch.cat([x[i], mu.expand(c, t), sd.expand(c, t)], dim=0)
        else:
            full = x[i]
        h = w["tdnn.conv.conv.weight"][..., 0] @ full + w["tdnn.conv.conv.bias"][:, None]
        h = torch.relu(h)
        norm_scale = w["tdnn.norm.norm.weight"] / torch.sqrt(w["tdnn.norm.norm.running_var"] + 1e-5)
        h = (h - w["tdnn.norm.norm.running_mean"][:, None]) * norm_scale[:, None]
        h = h + w["tdnn.norm.norm.bias"][:, None]
        e = w["conv.conv.weight"][..., 0] @ torch.tanh(h) + w["conv.conv.bias"][:, None]
        e = e[:, valid]
        alpha = torch.exp(e - e.max(dim=1, keepdim=True).values)
        alpha = alpha / alpha.sum(dim=1, keepdim=True)
        mean = (alpha * xi).sum(dim=1)
        std = (alpha * (xi - mean[:, None]).pow(2)).sum(dim=1).clamp(min=1e-12).sqrt()
        outs.append(torch.cat([mean, std]))
    return torch.stack(outs)[..., None]


@pytest.mark.parametrize("global_context", [True, False])
@pytest.mark.parametrize("train", [False, True])
def test_matches_speechbrain(global_context, train):
    sb = SBPooling(6, attention_channels=5, global_context=global_context)
    randomise_norm_stats(sb)
    m = AttentiveStatisticsPooling(6, attention_channels=5, global_context=global_context)
    m.load_state_dict(sb.state_dict(), strict=True)
    sb.load_state_dict(m.state_dict(), strict=True)
    sb.train(train)
    m.train(train)
    x = torch.randn(4, 6, 13) * 2 + 1
    lengths = torch.tensor([1.0, 0.7, 0.31, 0.5])
    for lens in (lengths, None):
        torch.testing.assert_close(m(x, lens), sb(x, lens), rtol=1e-5, atol=1e-6)
    # batch-norm statistics evolve identically in training mode
    for key, value in sb.state_dict().items():
        torch.testing.assert_close(m.state_dict()[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("global_context", [True, False])
def test_matches_naive(global_context):
    m = AttentiveStatisticsPooling(7, attention_channels=4, global_context=global_context).eval()
    randomise_norm_stats(m)
    x = torch.randn(3, 7, 19)
    lengths = torch.tensor([0.45, 1.0, 0.1])
    out = m(x, lengths)
    assert out.shape == (3, 14, 1)
    assert rel_err(out, naive_pooling(m, x, lengths)) < 1e-5
    assert rel_err(m(x), naive_pooling(m, x, None)) < 1e-5


def test_padding_content_is_ignored_and_empty_items_are_finite():
    m = AttentiveStatisticsPooling(5, attention_channels=3).eval()
    x = torch.randn(2, 5, 12)
    lengths = torch.tensor([0.5, 0.0])
    y = x.clone()
    y[0, :, 6:] = torch.randn(5, 6) * 50
    torch.testing.assert_close(m(x, lengths)[0], m(y, lengths)[0])
    empty = m(x, lengths)[1, :, 0]
    torch.testing.assert_close(empty[:5], torch.zeros(5))
    torch.testing.assert_close(empty[5:], torch.full((5,), 1e-6))


@pytest.mark.parametrize("global_context", [True, False])
def test_gradcheck(global_context):
    m = AttentiveStatisticsPooling(3, 4, global_context=global_context).double().eval()
    randomise_norm_stats(m)
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([1.0, 0.6], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: m(t, lengths), (x,))


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_backend_is_passed_on(monkeypatch, backend):
    seen = []
    real = pooling_module.attention

    def spy(*args, **kwargs):
        seen.append(kwargs["backend"])
        return real(*args, **kwargs)

    monkeypatch.setattr(pooling_module, "attention", spy)
    AttentiveStatisticsPooling(4, 3, backend=backend).eval()(torch.randn(2, 4, 5))
    assert seen == [backend, backend]


def test_compile_and_export():
    m = AttentiveStatisticsPooling(8, attention_channels=6).eval()
    randomise_norm_stats(m)
    x, lengths = torch.randn(3, 8, 21), torch.tensor([1.0, 0.52, 0.3])
    expected = m(x, lengths)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, lengths), expected)
    exported = torch.export.export(m, (x, lengths)).module()
    torch.testing.assert_close(exported(x, lengths), expected)
