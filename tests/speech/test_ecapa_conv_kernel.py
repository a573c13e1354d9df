"""The compiled time-major convolution (attn_speech.ecapa.conv_kernel) against float64
``F.conv1d``: odd lengths and widths, partial panels and tiles, inputs wider than one pass,
strided views, per-item biases, one and two threads; bad arguments refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attn_speech.ecapa import conv_kernel

pytestmark = pytest.mark.skipif(
    not conv_kernel.available(), reason=f"no kernel: {conv_kernel.build_error()}"
)


def _reference(x, w, bias, dilation, relu):
    y = F.conv1d(x.double().transpose(1, 2), w.double(), dilation=dilation).transpose(1, 2)
    y = y + (bias.double()[:, None] if bias.dim() == 2 else bias.double())
    return y.relu() if relu else y


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(
    ("b", "t", "cin", "cout", "k", "d"),
    [
        (1, 61, 80, 144, 5, 1),  # two whole panels and one of 16 channels; 61 = 10 x 6 + 1
        (3, 13, 128, 128, 3, 4),  # a Res2Net group's shape, batched
        (2, 7, 1100, 48, 1, 1),  # more input channels than one pass over a panel takes
        (1, 1, 16, 16, 3, 2),  # one frame, one vector of outputs
        (2, 500, 33, 64, 1, 1),  # T = 500: tiles of 5 and 6 rows
    ],
)
def test_conv_equals_float64_conv1d(dtype, threads, b, t, cin, cout, k, d):
    g = torch.Generator().manual_seed(b * t + cin + k)
    rows = t + (k - 1) * d
    # a strided view: items and rows further apart than the channels
    x = torch.randn(b + 1, rows + 3, cin + 5, generator=g, dtype=dtype)[1:, 2 : 2 + rows, 3:-2]
    w = torch.randn(cout, cin, k, generator=g, dtype=dtype) / (cin * k) ** 0.5
    bias = torch.randn(cout, generator=g, dtype=dtype)
    per_item = torch.randn(b, cout, generator=g, dtype=dtype)
    packed = conv_kernel.pack_weight(w)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 0}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for bias_ in (bias, per_item):
            for relu in (False, True):
                y = conv_kernel.conv(x, packed, cout, k, d, bias_, relu)
                assert y.shape == (b, t, cout) and y.dtype == dtype and y.is_contiguous()
                torch.testing.assert_close(y.double(), _reference(x, w, bias_, d, relu), **tol)
    finally:
        torch.set_num_threads(before)


def test_pack_weight_converts_the_dtype_and_refuses_partial_vectors():
    w = torch.randn(32, 3, 2)
    assert conv_kernel.pack_weight(w, torch.float64).dtype == torch.float64
    # panel 0 (32 outputs, the whole layer): tap j, input k, output n at (j * 3 + k) * 32 + n
    packed = conv_kernel.pack_weight(w)
    assert packed[(1 * 3 + 2) * 32 + 5] == w[5, 2, 1]
    with pytest.raises(ValueError, match="multiple of 16"):
        conv_kernel.pack_weight(torch.randn(20, 3, 1))


def test_conv_refuses_bad_arguments():
    x = torch.randn(2, 10, 8)
    w = torch.randn(16, 8, 3)
    packed = conv_kernel.pack_weight(w)
    bias = torch.zeros(16)
    with pytest.raises(ValueError, match="unit stride"):
        conv_kernel.conv(
            x.transpose(1, 2).contiguous().transpose(1, 2), packed, 16, 3, 1, bias, True
        )
    with pytest.raises(ValueError, match="more rows than taps"):
        conv_kernel.conv(x[:, :4], packed, 16, 3, 2, bias, True)
    with pytest.raises(ValueError, match="packed weights"):
        conv_kernel.conv(x, packed[:-1], 16, 3, 1, bias, True)
    with pytest.raises(ValueError, match="packed weights"):
        conv_kernel.conv(x.double(), packed, 16, 3, 1, bias, True)
    with pytest.raises(ValueError, match="bias"):
        conv_kernel.conv(x, packed, 16, 3, 1, torch.zeros(3, 16), True)
    assert not conv_kernel.supports(x, torch.randn(20, 8, 1))  # outputs not whole vectors
    assert not conv_kernel.supports(x, torch.randn(16, 8, 9))  # more taps than the kernel has
    assert not conv_kernel.supports(x.bfloat16(), w)


def test_layers_take_the_kernel_only_with_wide_registers(monkeypatch):
    x, w = torch.randn(1, 5, 8), torch.randn(16, 8, 1)
    monkeypatch.setattr(conv_kernel, "WIDE_REGISTERS", True)
    assert conv_kernel.supports(x, w)
    monkeypatch.setattr(conv_kernel, "WIDE_REGISTERS", False)
    assert not conv_kernel.supports(x, w)
