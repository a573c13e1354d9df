"""The compiled InstanceNorm + PReLU pass against a float64 naive computation and against
PyTorch's modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attn_speech.enhance import norm_kernel
from attn_speech.enhance.model import ConvNormAct

pytestmark = pytest.mark.skipif(not norm_kernel.available(), reason="kernel did not build")


def naive(x, gamma, beta, alpha, eps):
    x = x.double()
    mean = x.mean(dim=(2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(2, 3), keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps) * gamma.double()[:, None, None]
    y = y + beta.double()[:, None, None]
    a = alpha.double().expand(x.shape[1])[:, None, None]
    return torch.where(y > 0, y, a * y)


def modules(channels, shared_slope, gen):
    norm = nn.InstanceNorm2d(channels, affine=True, eps=1e-5)
    act = nn.PReLU(1 if shared_slope else channels)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(channels, generator=gen))
        norm.bias.copy_(torch.randn(channels, generator=gen))
        act.weight.copy_(torch.randn(act.weight.shape, generator=gen))
    return norm, act


@pytest.mark.parametrize("shape", [(2, 3, 7, 5), (1, 5, 41, 33), (3, 2, 1, 17), (1, 1, 64, 64)])
@pytest.mark.parametrize("shared_slope", [False, True])
def test_matches_float64_naive(shape, shared_slope):
    gen = torch.Generator().manual_seed(sum(shape) + shared_slope)
    norm, act = modules(shape[1], shared_slope, gen)
    x = torch.randn(shape, dtype=torch.float64, generator=gen) * 3 + 5  # a far-off mean
    want = naive(x, norm.weight, norm.bias, act.weight.detach(), norm.eps)
    with torch.no_grad():
        got = norm_kernel.instance_norm_prelu(x, norm.double(), act.double())
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        got32 = norm_kernel.instance_norm_prelu(x.float(), norm.float(), act.float())
        torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got32, act(norm(x.float())), rtol=1e-5, atol=1e-5)


def test_writes_into_a_slice_of_a_wider_buffer():
    gen = torch.Generator().manual_seed(0)
    norm, act = modules(4, False, gen)
    x = torch.randn(2, 4, 9, 11, generator=gen)
    buf = torch.full((2, 12, 9, 11), float("nan"))
    with torch.no_grad():
        norm_kernel.instance_norm_prelu(x, norm, act, out=buf[:, 4:8])
        torch.testing.assert_close(buf[:, 4:8], act(norm(x)), rtol=1e-5, atol=1e-5)
    assert buf[:, :4].isnan().all() and buf[:, 8:].isnan().all()
    with pytest.raises(ValueError, match="contiguous planes"):
        norm_kernel.instance_norm_prelu(x, norm, act, out=buf.transpose(2, 3)[:, :4])


def test_conv_norm_act_paths_agree_and_keep_parameter_names():
    torch.manual_seed(1)
    block = ConvNormAct(nn.Conv2d(3, 6, 3, padding=1), 6).double()
    assert [k for k, _ in block.named_parameters()] == [
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "2.weight",
    ]
    x = torch.randn(2, 3, 13, 10, dtype=torch.float64)
    want = block(x)  # parameters require grad: PyTorch's modules
    assert not norm_kernel.supports(block[0](x), block[1], block[2])
    with torch.no_grad():
        assert norm_kernel.supports(block[0](x), block[1], block[2])
        got = block(x)
    torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)


def test_traced_network_records_pytorch_ops():
    """TorchScript tracing takes the PyTorch paths (a tracer cannot see the kernels)."""
    from attn_speech.enhance.model import MambAttention
    from attn_speech.enhance.stft import mag_pha_stft

    torch.manual_seed(3)
    model = MambAttention(channels=8, num_blocks=1, num_heads=2, d_state=4, expand=2).eval()
    mag, pha, _ = mag_pha_stft(torch.randn(1, 2400), model.stft)
    mag2, pha2, _ = mag_pha_stft(torch.randn(1, 2400), model.stft)  # same length, new values
    with torch.no_grad():
        traced = torch.jit.trace(model, (mag, pha), check_trace=False)
        for got, want in zip(traced(mag2, pha2), model(mag2, pha2)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
