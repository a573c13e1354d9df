"""AttentionGate against MONAI's AttentionBlock and a float64 naive reference."""

from __future__ import annotations

import math

import pytest
import torch
from monai.networks.nets.attentionunet import AttentionBlock

from core_attention.layers.attention_gate import AttentionGate


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def randomise_norms(module):
    with torch.no_grad():
        for norm in module.modules():
            if isinstance(norm, torch.nn.modules.batchnorm._BatchNorm):
                norm.running_mean.normal_()
                norm.running_var.uniform_(0.5, 2.0)
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.normal_()


def linear_matrix(n_out: int, n_in: int) -> torch.Tensor:
    """[n_out, n_in] weights of 1D linear resampling with half-pixel centres."""
    mat = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(math.floor(src), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        mat[i, i0] += 1 - frac
        mat[i, i1] += frac
    return mat


def resample(t: torch.Tensor, size) -> torch.Tensor:
    """Separable (bi/tri)linear resampling of [B, C, *S] to ``size``."""
    for axis, n_out in enumerate(size, start=2):
        mat = linear_matrix(n_out, t.shape[axis])
        t = torch.movedim(torch.tensordot(t, mat, dims=([axis], [1])), -1, axis)
    return t


def naive_branch(w, prefix, t, stride, norm):
    """Conv with kernel = stride (1 by default) written as block sums, then eval batch norm."""
    weight, bias = w[f"{prefix}.0.conv.weight"], w[f"{prefix}.0.conv.bias"]
    dims = t.dim() - 2
    grid = [s // stride for s in t.shape[2:]]
    t = t[(slice(None), slice(None), *[slice(0, g * stride) for g in grid])]
    blocks = t.reshape(t.shape[0], t.shape[1], *[d for g in grid for d in (g, stride)])
    # [B, Cin, g1, s, g2, s, ...] -> [B, g1, g2, ..., Cin, s, s, ...]
    order = [0, *range(2, 2 + 2 * dims, 2), 1, *range(3, 3 + 2 * dims, 2)]
    blocks = blocks.permute(order)
    out = torch.tensordot(
        blocks, weight, dims=(list(range(1 + dims, 2 + 2 * dims)), [1, *range(2, 2 + dims)])
    )
    out = torch.movedim(out + bias, -1, 1)
    if norm:
        shape = (1, -1) + (1,) * dims
        scale = w[f"{prefix}.1.weight"] / torch.sqrt(w[f"{prefix}.1.running_var"] + 1e-5)
        out = (out - w[f"{prefix}.1.running_mean"].view(shape)) * scale.view(shape)
        out = out + w[f"{prefix}.1.bias"].view(shape)
    return out


def naive_gate(m, g, x, norm=True):
    w = {k: v.double() for k, v in m.state_dict().items()}
    g, x = g.double(), x.double()
    x1 = naive_branch(w, "W_x", x, m.sub_sample, norm)
    g1 = resample(naive_branch(w, "W_g", g, 1, norm), x1.shape[2:])
    alpha = torch.sigmoid(naive_branch(w, "psi", torch.relu(g1 + x1), 1, norm))
    alpha = resample(alpha, x.shape[2:])
    return x * alpha, alpha


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("train", [False, True])
def test_matches_monai_attention_block(dims, train):
    ref = AttentionBlock(dims, f_int=4, f_g=6, f_l=5)
    randomise_norms(ref)
    m = AttentionGate(dims, 4, 6, 5)
    m.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(m.state_dict(), strict=True)
    ref.train(train)
    m.train(train)
    size = (7, 9) if dims == 2 else (5, 3, 7)
    g, x = torch.randn(2, 6, *size), torch.randn(2, 5, *size)
    torch.testing.assert_close(m(g, x), ref(g, x), rtol=1e-5, atol=1e-6)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(m.state_dict()[key], value)


CASES = [
    # dims, g size, x size, sub_sample, norm
    (2, (7, 9), (7, 9), 1, True),
    (2, (4, 4), (9, 7), 1, True),
    (2, (5, 4), (11, 9), 2, False),
    (2, (3, 3), (9, 9), 3, True),
    (3, (2, 3, 2), (5, 7, 4), 1, False),
    (3, (3, 2, 3), (7, 5, 6), 2, True),
]


@pytest.mark.parametrize(("dims", "g_size", "x_size", "sub_sample", "norm"), CASES)
def test_matches_naive(dims, g_size, x_size, sub_sample, norm):
    m = AttentionGate(dims, 3, 4, 5, sub_sample=sub_sample, norm=norm).eval()
    randomise_norms(m)
    g, x = torch.randn(2, 4, *g_size), torch.randn(2, 5, *x_size)
    out, alpha = m(g, x, return_attention=True)
    ref_out, ref_alpha = naive_gate(m, g, x, norm)
    assert out.shape == x.shape
    assert alpha.shape == (2, 1, *x_size)
    assert rel_err(out, ref_out) < 1e-5
    assert rel_err(alpha, ref_alpha) < 1e-5
    torch.testing.assert_close(m(g, x), out)


@pytest.mark.parametrize("dims", [2, 3])
def test_gradcheck(dims):
    m = AttentionGate(dims, 2, 3, 2, sub_sample=2).double().eval()
    randomise_norms(m)
    g_size, x_size = ((2, 3), (5, 7)) if dims == 2 else ((2, 2, 1), (3, 5, 3))
    g = torch.randn(1, 3, *g_size, dtype=torch.float64, requires_grad=True)
    x = torch.randn(1, 2, *x_size, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (g, x))


@pytest.mark.parametrize("dims", [2, 3])
def test_compile_and_export(dims):
    m = AttentionGate(dims, 4, 6, 5, sub_sample=2).eval()
    randomise_norms(m)
    g_size, x_size = ((4, 5), (9, 11)) if dims == 2 else ((2, 3, 2), (5, 7, 4))
    g, x = torch.randn(2, 6, *g_size), torch.randn(2, 5, *x_size)
    expected = m(g, x, return_attention=True)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(g, x, return_attention=True), expected):
        torch.testing.assert_close(got, want)
    exported = torch.export.export(m, (g, x)).module()
    torch.testing.assert_close(exported(g, x), expected[0])


def test_errors():
    with pytest.raises(ValueError, match="spatial_dims"):
        AttentionGate(1, 4, 4, 4)
    m = AttentionGate(2, 4, 4, 4)
    with pytest.raises(ValueError, match="4-D"):
        m(torch.randn(1, 4, 3, 3, 3), torch.randn(1, 4, 3, 3))
    with pytest.raises(ValueError, match="batch"):
        m(torch.randn(2, 4, 3, 3), torch.randn(1, 4, 3, 3))
