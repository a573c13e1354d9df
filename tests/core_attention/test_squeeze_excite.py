"""SqueezeExcitation1d/2d against SpeechBrain's SEBlock, timm's SEModule and a float64 naive
reference."""

from __future__ import annotations

import pytest
import torch
from speechbrain.lobes.models.ECAPA_TDNN import SEBlock
from timm.layers import SEModule
from timm.layers.helpers import make_divisible as timm_make_divisible
from torch import nn

from core_attention.layers.squeeze_excite import (
    SqueezeExcitation1d,
    SqueezeExcitation2d,
    make_divisible,
)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def naive_se1d(m, x, lengths):
    """Mean over frames t < lengths * T, two pointwise layers, sigmoid gate, in float64."""
    w = {k: v.double() for k, v in m.state_dict().items()}
    x = x.double()
    t = x.shape[-1]
    s = torch.empty(x.shape[:2], dtype=torch.float64)
    for i in range(x.shape[0]):
        valid = [f for f in range(t) if lengths is None or f < float(lengths[i]) * t]
        s[i] = x[i, :, valid].mean(dim=1)
    h = torch.relu(s @ w["conv1.conv.weight"][..., 0].T + w["conv1.conv.bias"])
    gate = torch.sigmoid(h @ w["conv2.conv.weight"][..., 0].T + w["conv2.conv.bias"])
    return x * gate[..., None]


def naive_se2d(m, x):
    w = {k: v.double() for k, v in m.state_dict().items()}
    x = x.double()
    s = x.mean(dim=(2, 3))
    h = torch.relu(s @ w["fc1.weight"][..., 0, 0].T + w["fc1.bias"])
    gate = torch.sigmoid(h @ w["fc2.weight"][..., 0, 0].T + w["fc2.bias"])
    return x * gate[..., None, None]


def test_se1d_matches_speechbrain_seblock():
    sb = SEBlock(12, 5, 12)
    m = SqueezeExcitation1d(12, 5, 12)
    m.load_state_dict(sb.state_dict(), strict=True)
    sb.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(4, 12, 13)
    lengths = torch.tensor([1.0, 0.7, 0.31, 0.5])  # 0.7 * 13 is not an integer
    torch.testing.assert_close(m(x, lengths), sb(x, lengths), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m(x), sb(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("with_lengths", [False, True])
def test_se1d_matches_naive(with_lengths):
    m = SqueezeExcitation1d(9, 4)
    x = torch.randn(3, 9, 17)
    lengths = torch.tensor([0.2, 1.0, 0.77]) if with_lengths else None
    assert rel_err(m(x, lengths), naive_se1d(m, x, lengths)) < 1e-5


def test_se1d_ignores_padding_and_empty_items():
    m = SqueezeExcitation1d(6, 3)
    x = torch.randn(2, 6, 10)
    lengths = torch.tensor([0.5, 0.0])
    y = x.clone()
    y[0, :, 5:] = torch.randn(6, 5) * 100
    torch.testing.assert_close(m(x, lengths)[0, :, :5], m(y, lengths)[0, :, :5])
    assert torch.isfinite(m(x, lengths)).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rd_ratio": 1 / 16},
        {"rd_ratio": 0.25, "rd_divisor": 1},
        {"rd_channels": 7, "bias": False},
        {"rd_ratio": 1 / 8, "norm_layer": nn.BatchNorm2d, "act_layer": nn.SiLU},
    ],
)
def test_se2d_matches_timm_semodule(kwargs):
    ref = SEModule(40, **kwargs).eval()
    m = SqueezeExcitation2d(40, **kwargs).eval()
    if "norm_layer" in kwargs:
        with torch.no_grad():
            ref.bn.running_mean.normal_()
            ref.bn.running_var.uniform_(0.5, 2.0)
    m.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(2, 40, 7, 5)
    torch.testing.assert_close(m(x), ref(x), rtol=1e-6, atol=1e-6)


def test_se2d_matches_naive():
    m = SqueezeExcitation2d(24, rd_ratio=0.25)
    x = torch.randn(3, 24, 5, 9)
    assert rel_err(m(x), naive_se2d(m, x)) < 1e-5


def test_make_divisible_matches_timm():
    for v in [0.5, 1, 3.9, 4, 4.1, 11.99, 12, 20.5, 100.0, 127.3]:
        for divisor in (1, 4, 8):
            assert make_divisible(v, divisor) == timm_make_divisible(v, divisor, round_limit=0.0)


def test_gradcheck():
    m1 = SqueezeExcitation1d(5, 3).double()
    x = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([1.0, 0.6], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: m1(t, lengths), (x,))
    m2 = SqueezeExcitation2d(8, rd_channels=3).double()
    x2 = torch.randn(2, 8, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m2, (x2,))


def test_compile_and_export():
    m1 = SqueezeExcitation1d(8, 4).eval()
    m2 = SqueezeExcitation2d(16, rd_channels=4).eval()
    x1, lengths = torch.randn(2, 8, 11), torch.tensor([1.0, 0.4])
    x2 = torch.randn(2, 16, 5, 7)
    c1 = torch.compile(m1, backend="aot_eager", fullgraph=True)
    c2 = torch.compile(m2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(c1(x1, lengths), m1(x1, lengths))
    torch.testing.assert_close(c2(x2), m2(x2))
    e1 = torch.export.export(m1, (x1, lengths)).module()
    e2 = torch.export.export(m2, (x2,)).module()
    torch.testing.assert_close(e1(x1, lengths), m1(x1, lengths))
    torch.testing.assert_close(e2(x2), m2(x2))


def test_errors():
    with pytest.raises(ValueError, match="out_channels"):
        SqueezeExcitation1d(8, 4, 6)
    with pytest.raises(ValueError, match=r"\[B, C, T\]"):
        SqueezeExcitation1d(8, 4)(torch.randn(8, 5))
    with pytest.raises(TypeError, match="relative"):
        SqueezeExcitation1d(8, 4)(torch.randn(2, 8, 5), torch.tensor([5, 3]))
