"""One Strassen level (attn_speech.ecapa.strassen_kernel) against float64 products: odd and
even row counts (an odd count pads the bottom half with a zero row), batches, ReLU on and off,
one to three threads; the network with it against the reference model; bad arguments
refused and the layers it declines."""

from __future__ import annotations

import pytest
import torch

from attn_speech.ecapa import conv_kernel, strassen_kernel
from attn_speech.ecapa.config import EcapaConfig
from attn_speech.ecapa.fast import FastEcapa
from attn_speech.ecapa.lengths import relative_from_frames
from attn_speech.ecapa.model import EcapaTDNN
from attn_speech.ecapa.time_conv import TimeConv

pytestmark = pytest.mark.skipif(
    not strassen_kernel.available(), reason=f"no kernel: {strassen_kernel.build_error()}"
)


@pytest.fixture
def small_layers(monkeypatch):
    """Layers and inputs of test size take the kernel (on AVX2-only CPUs too)."""
    monkeypatch.setattr(conv_kernel, "WIDE_REGISTERS", True)
    monkeypatch.setattr(strassen_kernel, "_MIN_ROWS", 2)
    monkeypatch.setattr(strassen_kernel, "_MIN_INPUTS", 2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(
    ("b", "t", "k", "n"),
    [
        (1, 37, 96, 128),  # odd rows: the bottom half one short
        (2, 33, 62, 256),  # a batch: its rows are one matrix; K / 2 odd
        (1, 501, 256, 384),  # three column panels per half
        (3, 1, 8, 128),  # three rows
        (1, 2, 8, 128),  # the fewest rows
    ],
)
def test_strassen_equals_float64_product(dtype, threads, b, t, k, n):
    g = torch.Generator().manual_seed(b * t + k + n)
    x = torch.rand(b, t, k, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(n, k, 1, generator=g, dtype=torch.float64) / k**0.5).to(dtype)
    bias = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    exact = x.double() @ w[:, :, 0].double().T + bias.double()
    packed = strassen_kernel.pack_products(w, dtype)
    tol = {"atol": 1e-12, "rtol": 0} if dtype == torch.float64 else {"atol": 2e-5, "rtol": 1e-5}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for relu in (False, True):
            y = strassen_kernel.strassen(x, packed, n, bias, relu)
            assert y.shape == (b, t, n) and y.dtype == dtype and y.is_contiguous()
            torch.testing.assert_close(y.double(), exact.relu() if relu else exact, **tol)
    finally:
        torch.set_num_threads(before)


def test_time_conv_takes_it_only_where_set_and_supported(small_layers, monkeypatch):
    calls = []
    run = strassen_kernel.strassen
    monkeypatch.setattr(strassen_kernel, "strassen", lambda *a: calls.append(1) or run(*a))
    w, bias = torch.randn(128, 64, 1) / 8, torch.randn(128)
    x = torch.rand(2, 9, 64)
    conv = TimeConv(w, bias)
    plain = conv(x)
    assert calls == []  # not set
    conv.strassen = True
    torch.testing.assert_close(conv(x), plain, atol=2e-5, rtol=1e-5)
    assert calls == [1]
    monkeypatch.setattr(strassen_kernel, "_MIN_ROWS", 128)
    torch.testing.assert_close(conv(x), plain, atol=0, rtol=0)  # 18 rows: the plain product
    assert calls == [1]


def test_supports_declines_what_does_not_repay_it(monkeypatch):
    monkeypatch.setattr(conv_kernel, "WIDE_REGISTERS", True)
    w = torch.randn(3072, 3072, 1)
    assert strassen_kernel.supports(torch.rand(1, 500, 3072), w)
    assert not strassen_kernel.supports(torch.rand(1, 100, 3072), w)  # too few rows
    assert not strassen_kernel.supports(torch.rand(1, 500, 1536), torch.randn(1536, 1536, 1))
    assert not strassen_kernel.supports(torch.rand(1, 500, 3072), torch.randn(3008, 3072, 1))
    assert not strassen_kernel.supports(torch.rand(1, 500, 3080)[..., :3072], w)  # a view
    assert not strassen_kernel.supports(torch.rand(1, 500, 3072).bfloat16(), w)
    monkeypatch.setattr(conv_kernel, "WIDE_REGISTERS", False)
    assert not strassen_kernel.supports(torch.rand(1, 500, 3072), w)


def test_bad_arguments_are_refused():
    w = torch.randn(128, 64, 1)
    packed = strassen_kernel.pack_products(w, torch.float32)
    x, bias = torch.rand(1, 10, 64), torch.zeros(128)
    with pytest.raises(ValueError, match="not supported"):
        strassen_kernel.strassen(x[:, :, :63], packed, 128, bias, True)  # odd K, a view
    with pytest.raises(ValueError, match="not supported"):
        strassen_kernel.strassen(x, packed, 96, bias, True)
    with pytest.raises(ValueError, match="packed weights"):
        strassen_kernel.strassen(x, packed.double(), 128, bias, True)
    with pytest.raises(ValueError, match="bias"):
        strassen_kernel.strassen(x, packed, 128, torch.zeros(64), True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("frames", [[157, 101, 3], [93]])
def test_fast_network_with_strassen_equals_reference(
    small_layers, monkeypatch, dtype, frames, random_batchnorm
):
    torch.manual_seed(len(frames))
    cfg = EcapaConfig(channels=(128, 128, 128, 128, 384), attention_channels=8, se_channels=8)
    model = EcapaTDNN(cfg).eval()
    random_batchnorm(model)
    model = model.to(dtype)
    fast = FastEcapa(model)
    calls = []
    run = strassen_kernel.strassen
    monkeypatch.setattr(strassen_kernel, "strassen", lambda *a: calls.append(1) or run(*a))
    t = max(frames)
    feats = torch.randn(len(frames), t, 80, dtype=dtype)
    lengths = relative_from_frames(torch.tensor(frames), t) if len(frames) > 1 else None
    got = fast(feats, lengths)
    assert calls == [1]  # the aggregation layer
    with torch.no_grad():
        expected = model(feats, lengths)
    tol = {"atol": 3e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-10}
    torch.testing.assert_close(got, expected, **tol)
