"""FastEcapa's numerical pieces against float64 naive computations and the reference model:
time-major convolutions (oneDNN and the GEMM fallback), reflection padding, attentive
statistics pooling with the BatchNorm pending, whole networks on odd lengths and batches."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from attn_speech.ecapa import conv_kernel, time_conv
from attn_speech.ecapa.config import EcapaConfig
from attn_speech.ecapa.fast import FastEcapa
from attn_speech.ecapa.fast_pooling import FastAttentivePooling
from attn_speech.ecapa.lengths import relative_from_frames
from attn_speech.ecapa.model import EcapaTDNN
from attn_speech.ecapa.time_conv import TimeConv, pad_time, reflect_edges
from core_attention.layers.attentive_pooling import AttentiveStatisticsPooling

native_conv = conv_kernel.conv


@pytest.fixture(params=["native", "onednn", "onednn-inner-product", "gemm"])
def conv_path(request, monkeypatch):
    if request.param == "native":
        if not conv_kernel.available():
            pytest.skip(f"the convolution kernel does not build: {conv_kernel.build_error()}")
        monkeypatch.setattr(conv_kernel, "WIDE_REGISTERS", True)  # also on AVX2-only CPUs
        return request.param
    monkeypatch.setattr(time_conv, "NATIVE", False)
    if request.param == "gemm":
        monkeypatch.setattr(time_conv, "ONEDNN", False)
    elif not time_conv.ONEDNN:
        pytest.skip("oneDNN not available")
    elif request.param == "onednn-inner-product":  # every 1x1 layer, not only the large ones
        monkeypatch.setattr(time_conv, "_INNER_PRODUCT_BYTES", 0)
    return request.param


@pytest.mark.parametrize(
    ("cin", "cout", "k", "d", "t"),
    [(7, 5, 1, 1, 13), (9, 6, 3, 3, 17), (7, 48, 1, 1, 13), (9, 80, 5, 2, 17)],
)
@pytest.mark.parametrize("relu", [True, False])
def test_time_conv_equals_float64_conv(conv_path, monkeypatch, cin, cout, k, d, t, relu):
    calls = []
    monkeypatch.setattr(conv_kernel, "conv", lambda *a: calls.append(1) or native_conv(*a))
    g = torch.Generator().manual_seed(11 * t + k)
    w, b = torch.randn(cout, cin, k, generator=g), torch.randn(cout, generator=g)
    p = d * (k - 1) // 2
    x = torch.randn(3, t + 2 * p, cin, generator=g)
    expected = F.conv1d(x.double().transpose(1, 2), w.double(), b.double(), dilation=d)
    expected = expected.transpose(1, 2)
    if relu:
        expected = expected.relu()
    conv = TimeConv(w, b, d, relu=relu)
    with torch.inference_mode():
        y = conv(x)
        torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)
        assert y.shape == (3, t, cout) and y.is_contiguous()
        other = torch.randn(cout, generator=g)
        flipped = conv(x, other, relu=not relu)
    expected = F.conv1d(x.double().transpose(1, 2), w.double(), other.double(), dilation=d)
    expected = expected.transpose(1, 2)
    expected = expected if relu else expected.relu()
    torch.testing.assert_close(flipped.double(), expected, atol=1e-5, rtol=1e-5)
    # the kernel takes every layer whose outputs come in whole vectors of 16, and only then
    assert len(calls) == (2 if conv_path == "native" and cout % 16 == 0 else 0)


_NO_REORDER_SCRIPT = """
import torch, torch.nn.functional as F
from attn_speech.ecapa import time_conv
from attn_speech.ecapa.time_conv import TimeConv
time_conv.NATIVE = False  # oneDNN's convolutions
torch.set_num_threads(2)
torch.manual_seed(0)
# oneDNN blocks these layers' weights differently at different lengths (1536 -> 1536: by 48
# at 400 frames, by 64 at 250)
convs = [TimeConv(torch.randn(co, ci, k) * 0.02, torch.randn(co), d)
         for ci, co, k, d in [(1536, 1536, 1, 1), (128, 1536, 1, 1), (64, 64, 3, 2)]]
convs.append(TimeConv(convs[0].weight.clone(), convs[0].bias.clone()))  # same shape
lengths = [90, 150, 250, 400, 460]
with torch.inference_mode():
    for rnd in (1, 2):
        print(f"round {rnd}", flush=True)
        for t in lengths:
            for conv in convs:
                x = torch.randn(1, t + 2 * conv.pad, conv.weight.shape[1])
                y = conv(x)
                w, b = conv.weight.double(), conv.bias.double()  # float64: not through oneDNN
                ref = F.conv1d(x.double().transpose(1, 2), w, b, dilation=conv.dilation)
                err = (y - ref.transpose(1, 2).relu()).abs().max().item()
                assert err < 1e-3, err
    print("layouts", [len(c._packed) for c in convs], flush=True)
"""


@pytest.mark.skipif(not time_conv.ONEDNN, reason="oneDNN not available")
def test_onednn_weights_are_not_reordered_once_each_length_was_seen(tmp_path):
    """Each layer keeps its weights in every blocked layout oneDNN asked for, so a length
    seen before runs without converting weights (oneDNN's verbose log lists no reorder)."""
    script = tmp_path / "layouts.py"
    script.write_text(_NO_REORDER_SCRIPT)
    env = dict(os.environ, ONEDNN_VERBOSE="1", OMP_NUM_THREADS="2")
    out = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, check=True
    ).stdout
    first, second = out.split("round 2")
    # a reorder's line ends with the dimensions it converted; weights are [C_out, C_in, 1, k]
    weights = {",1536x1536x1x1,", ",1536x128x1x1,", ",64x64x1x3,"}

    def weight_reorders(log):
        lines = [line for line in log.splitlines() if ",reorder," in line]
        return [line for line in lines if any(w in line for w in weights)]

    assert weight_reorders(first)  # the log does list them, while packing
    assert weight_reorders(second) == []
    layouts = [int(n) for n in second.split("layouts [")[1].split("]")[0].split(",")]
    assert max(layouts) >= 2  # the lengths did ask for several layouts
    assert layouts[0] == layouts[-1]  # the layer of the same shape packed the same ones


def test_reflection_padding_matches_reference_padding():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 11, 4, generator=g)
    for pad in (1, 2, 4):
        expected = F.pad(x.transpose(1, 2), (pad, pad), mode="reflect").transpose(1, 2)
        torch.testing.assert_close(pad_time(x, pad, None), expected, atol=0, rtol=0)
        buf = torch.full((3, 11 + 2 * pad, 4), float("nan"))
        buf[:, pad : pad + 11] = x
        torch.testing.assert_close(reflect_edges(buf, pad), expected, atol=0, rtol=0)
    short = x[:, :3]  # shorter than the padding: the general index path
    buf = torch.full((3, 3 + 8, 4), float("nan"))
    buf[:, 4:7] = short
    torch.testing.assert_close(reflect_edges(buf, 4), pad_time(short, 4, None), atol=0, rtol=0)
    frames = torch.tensor([11, 6, 9])
    padded = pad_time(x, 3, frames)
    for i, f in enumerate(frames.tolist()):
        alone = F.pad(x[i : i + 1, :f].transpose(1, 2), (3, 3), mode="reflect").transpose(1, 2)
        torch.testing.assert_close(padded[i : i + 1, : f + 6], alone, atol=0, rtol=0)


def _naive_pooling(asp, x, frames):
    """float64 attentive statistics pooling, written from the paper's equations."""
    asp = asp.double()
    out = []
    for i, f in enumerate(frames.tolist()):
        xi = x[i, :, :f].double()  # [C, f]
        mean, std = xi.mean(1), xi.var(1, correction=0).clamp(min=asp.eps).sqrt()
        inp = xi
        if asp.global_context:
            inp = torch.cat([xi, mean[:, None].expand_as(xi), std[:, None].expand_as(xi)])
        h = asp.tdnn(inp[None])[0]
        e = asp.conv(torch.tanh(h)[None])[0]
        alpha = torch.softmax(e, dim=1)
        mu = (alpha * xi).sum(1)
        sigma = (alpha * (xi - mu[:, None]) ** 2).sum(1).clamp(min=asp.eps).sqrt()
        out.append(torch.cat([mu, sigma]))
    return torch.stack(out)


@pytest.mark.parametrize("global_context", [True, False])
def test_pooling_with_pending_batchnorm_equals_float64_naive(
    conv_path, global_context, random_batchnorm
):
    torch.manual_seed(5)
    c, t = 12, 23
    asp = AttentiveStatisticsPooling(c, attention_channels=6, global_context=global_context)
    random_batchnorm(asp)
    asp.eval()
    a, b = torch.randn(c), torch.randn(c)
    u = torch.rand(3, t, c) * 2
    frames = torch.tensor([23, 9, 17])
    x = (a * u + b).transpose(1, 2)  # what the reference pooling reads, [B, C, T]
    fast = FastAttentivePooling(asp, a, b)
    with torch.inference_mode():
        batched = fast(u, frames)
        alone = torch.cat([fast(u[i : i + 1, :f]) for i, f in enumerate(frames.tolist())])
    expected = _naive_pooling(asp, x, frames)
    torch.testing.assert_close(batched.double(), expected, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(alone.double(), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("frames", [[157, 101, 77], [93]])
def test_fast_network_equals_reference_on_odd_lengths(conv_path, frames, random_batchnorm):
    cfg = EcapaConfig(channels=(48, 48, 48, 48, 144), attention_channels=8, se_channels=8)
    torch.manual_seed(len(frames))
    model = EcapaTDNN(cfg).eval()
    random_batchnorm(model)
    fast = FastEcapa(model)
    t = max(frames)
    feats = torch.randn(len(frames), t, 80)
    lengths = relative_from_frames(torch.tensor(frames), t)
    with torch.no_grad():
        expected = model(feats, lengths)
    got = fast(feats, lengths)
    assert got.shape == expected.shape == (len(frames), 1, 192)
    torch.testing.assert_close(got, expected, atol=3e-5, rtol=1e-5)
    for i, f in enumerate(frames):
        torch.testing.assert_close(fast(feats[i : i + 1, :f]), got[i : i + 1], atol=3e-5, rtol=1e-5)


def test_bfloat16_fast_network_stays_close():
    cfg = EcapaConfig(channels=(64, 64, 64, 64, 192), attention_channels=16, se_channels=16)
    torch.manual_seed(2)
    model = EcapaTDNN(cfg).eval()
    fast = FastEcapa(model)
    half = FastEcapa(model).to(torch.bfloat16)
    feats = torch.randn(2, 131, 80)
    lengths = relative_from_frames(torch.tensor([131, 88]), 131)
    full = fast(feats, lengths)[:, 0]
    low = half(feats.bfloat16(), lengths)[:, 0].float()
    assert F.cosine_similarity(full, low).min() > 0.999


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_consecutive_calls_of_other_lengths_and_batches_equal_fresh_modules(
    conv_path, dtype, random_batchnorm
):
    """One module called on changing lengths and batch sizes gives, call after call, what a
    fresh module and the reference network give: nothing of a call leaks into the next."""
    cfg = EcapaConfig(channels=(48, 48, 48, 48, 144), attention_channels=8, se_channels=8)
    torch.manual_seed(7)
    model = EcapaTDNN(cfg).eval()
    random_batchnorm(model)
    model = model.to(dtype)
    kept = FastEcapa(model)
    tol = {"atol": 3e-5, "rtol": 1e-5} if dtype == torch.float32 else {}
    for frames, t in [([61], 61), ([157, 101, 77], 157), ([93, 40], 93), ([61], 61), ([200], 200)]:
        feats = torch.randn(len(frames), t, 80, dtype=dtype)
        lengths = relative_from_frames(torch.tensor(frames), t)
        got = kept(feats, lengths)
        torch.testing.assert_close(got, FastEcapa(model)(feats, lengths), atol=0, rtol=0)
        with torch.no_grad():
            torch.testing.assert_close(got, model(feats, lengths), **tol)


def test_returned_embeddings_are_not_overwritten_by_later_calls(conv_path, random_batchnorm):
    cfg = EcapaConfig(channels=(48, 48, 48, 48, 144), attention_channels=8, se_channels=8)
    torch.manual_seed(8)
    model = EcapaTDNN(cfg).eval()
    random_batchnorm(model)
    fast = FastEcapa(model)
    first_feats = torch.randn(2, 120, 80)
    first = fast(first_feats)
    saved = first.clone()
    for shape in [(2, 120, 80), (1, 90, 80), (3, 150, 80)]:
        fast(torch.randn(*shape))
    torch.testing.assert_close(first, saved, atol=0, rtol=0)
    torch.testing.assert_close(fast(first_feats), saved, atol=0, rtol=0)
