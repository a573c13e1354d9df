"""The compiled attentive-statistics-pooling kernel against float64 statistics written from
the definitions (odd channel counts and lengths, padded batches, shifted and peaked inputs),
and FastAttentivePooling with the kernel against its PyTorch path."""

from __future__ import annotations

import pytest
import torch

from attn_speech.ecapa import pooling_kernel
from attn_speech.ecapa.fast_pooling import FastAttentivePooling
from core_attention.layers.attentive_pooling import AttentiveStatisticsPooling

pytestmark = pytest.mark.skipif(
    not pooling_kernel.available(),
    reason=f"no compiled pooling kernel: {pooling_kernel.build_error()}",
)

EPS = 1e-12


def _naive(u, scores, a, b, frames):
    """float64 weighted mean and standard deviation over time of x = a u + b, row by row."""
    out = []
    for i, f in enumerate(frames):
        x = a.double() * u[i, :f].double() + b.double()  # [f, C]
        if scores is None:
            alpha = torch.full_like(x, 1.0 / f)
        else:
            e = torch.exp(scores[i, :f].double() - scores[i, :f].double().max(dim=0).values)
            alpha = e / e.sum(dim=0)
        mean = (alpha * x).sum(dim=0)
        var = (alpha * (x - mean) ** 2).sum(dim=0)
        out.append(torch.cat([mean, var.clamp(min=EPS).sqrt()]))
    return torch.stack(out)


def _given_scores(scores, u, a, b, eps, frames=None):
    """The attentive statistics for ``scores`` as they are: the kernel's scoring layer the
    identity (each score is one product by 1 plus products by 0, so exact)."""
    c = scores.shape[-1]
    eye = torch.eye(c, dtype=scores.dtype)
    wt, bias = pooling_kernel.pack_scorer(eye, torch.zeros(c, dtype=scores.dtype))
    return pooling_kernel.attentive_mean_std(scores, wt, bias, u, a, b, eps, frames)


def _inputs(b, t, c, dtype, seed, offset=0.0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    u = (torch.rand(b, t, c, generator=g, dtype=torch.float64) * 2 + offset).to(dtype)
    scores = (torch.randn(b, t, c, generator=g, dtype=torch.float64) * spread).to(dtype)
    a = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    shift = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    return u, scores, a, shift


SHAPES = [  # batch, frames per row (T = the largest), channels
    (1, [1], 1),
    (1, [37], 5),
    (1, [64], 16),
    (2, [33, 77], 53),
    (3, [101, 64, 1], 37),
    (4, [65, 32, 31, 96], 70),
]
TOLERANCE = {torch.float64: (1e-12, 1e-12), torch.float32: (2e-5, 2e-5)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("b", "frames", "c"), SHAPES)
@pytest.mark.parametrize("padded", [True, False])
def test_statistics_equal_float64_naive(dtype, b, frames, c, padded):
    t = max(frames)
    u, scores, a, shift = _inputs(b, t, c, dtype, seed=b * 1000 + t + c)
    if not padded:
        frames = [t] * b
    lengths = torch.tensor(frames) if padded else None
    atol, rtol = TOLERANCE[dtype]
    got = pooling_kernel.mean_std(u, a, shift, EPS, lengths)
    assert got.shape == (b, 2 * c) and got.dtype == dtype
    torch.testing.assert_close(
        got.double(), _naive(u, None, a, shift, frames), atol=atol, rtol=rtol
    )
    got = _given_scores(scores, u, a, shift, EPS, lengths)
    assert got.shape == (b, 2 * c) and got.dtype == dtype
    expected = _naive(u, scores, a, shift, frames)
    torch.testing.assert_close(got.double(), expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_padded_frames_are_never_read(dtype):
    b, t, c = 3, 90, 21
    frames = [90, 47, 3]
    u, scores, a, shift = _inputs(b, t, c, dtype, seed=7)
    for i, f in enumerate(frames):
        u[i, f:] = float("nan")
        scores[i, f:] = float("inf")
    lengths = torch.tensor(frames)
    for got, expected in [
        (pooling_kernel.mean_std(u, a, shift, EPS, lengths), _naive(u, None, a, shift, frames)),
        (
            _given_scores(scores, u, a, shift, EPS, lengths),
            _naive(u, scores, a, shift, frames),
        ),
    ]:
        assert torch.isfinite(got).all()
        atol, rtol = TOLERANCE[dtype]
        torch.testing.assert_close(got.double(), expected, atol=atol, rtol=rtol)


def test_float32_has_no_cancellation_or_overflow():
    """A large common offset (variance cancellation) and scores far above exp's range
    (shift by the maximum); softmax weights peaked on a few frames across chunks."""
    b, t, c = 2, 300, 19
    u, scores, a, shift = _inputs(b, t, c, torch.float32, seed=3, offset=1000.0, spread=25.0)
    scores = scores + 500.0
    frames = [300, 157]
    lengths = torch.tensor(frames)
    got = pooling_kernel.mean_std(u, a, shift, EPS, lengths)
    torch.testing.assert_close(got.double(), _naive(u, None, a, shift, frames), atol=0, rtol=1e-5)
    got = _given_scores(scores, u, a, shift, EPS, lengths)
    expected = _naive(u, scores, a, shift, frames)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), expected, atol=0, rtol=1e-4)


def test_strided_inputs_and_threads():
    """Views with row and batch strides other than C's (read in place), and the work shared
    between threads (large enough to be split)."""
    b, t, c = 2, 400, 200
    u, scores, a, shift = _inputs(b, t, 3 * c, torch.float64, seed=11)
    u, scores, a, shift = u[..., c : 2 * c], scores[:, :, :c], a[:c], shift[:c]
    frames = [400, 211]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = _given_scores(scores, u, a, shift, EPS, torch.tensor(frames))
    finally:
        torch.set_num_threads(threads)
    expected = _naive(u, scores, a, shift, frames)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    ("b", "frames", "c", "k"),
    [(1, [37], 5, 3), (1, [130], 64, 128), (3, [101, 64, 1], 37, 7), (2, [33, 77], 70, 16)],
)
def test_scored_statistics_equal_float64_naive(dtype, b, frames, c, k):
    """Scores computed inside the pass from h [B, T, K] and the packed scoring layer."""
    t = max(frames)
    u, _, a, shift = _inputs(b, t, c, dtype, seed=b * 100 + t + c + k)
    g = torch.Generator().manual_seed(k)
    wide = torch.randn(b, t, k + 5, generator=g, dtype=torch.float64).to(dtype)
    h = wide[..., 2 : k + 2]  # a view: row stride K + 5
    w = (torch.randn(c, k, generator=g, dtype=torch.float64) / k**0.5).to(dtype)
    bias = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    scores = h.double() @ w.double().T + bias.double()
    wt, padded = pooling_kernel.pack_scorer(w, bias)
    lengths = torch.tensor(frames)
    for threads in (1, 2):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            got = pooling_kernel.attentive_mean_std(h, wt, padded, u, a, shift, EPS, lengths)
        finally:
            torch.set_num_threads(previous)
        assert got.shape == (b, 2 * c) and got.dtype == dtype
        atol, rtol = TOLERANCE[dtype]
        expected = _naive(u, scores, a, shift, frames)
        torch.testing.assert_close(got.double(), expected, atol=5 * atol, rtol=5 * rtol)


def test_rejects_mismatched_shapes():
    u = torch.rand(1, 10, 4)
    wt, bias = pooling_kernel.pack_scorer(torch.rand(4, 3), torch.rand(4))
    with pytest.raises(ValueError, match="h"):
        pooling_kernel.attentive_mean_std(
            torch.rand(1, 9, 3), wt, bias, u, torch.ones(4), torch.zeros(4), EPS
        )
    with pytest.raises(ValueError, match="pack_scorer"):
        pooling_kernel.attentive_mean_std(
            torch.rand(1, 10, 3), wt[:, :8], bias[:8], u, torch.ones(4), torch.zeros(4), EPS
        )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("global_context", [True, False])
@pytest.mark.parametrize("frames", [[41], [41, 17, 30]])
def test_fast_pooling_with_kernel_equals_torch_path(
    monkeypatch, random_batchnorm, dtype, global_context, frames
):
    torch.manual_seed(len(frames) + 2 * global_context)
    c, t = 21, max(frames)
    asp = AttentiveStatisticsPooling(c, attention_channels=6, global_context=global_context)
    asp = random_batchnorm(asp).eval().to(dtype)
    fast = FastAttentivePooling(asp, torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype))
    u = torch.rand(len(frames), t, c, dtype=dtype) * 2
    lengths = torch.tensor(frames) if len(frames) > 1 else None
    with torch.inference_mode():
        with_kernel = fast(u, lengths)
        monkeypatch.setattr(pooling_kernel, "supports", lambda x: False)
        without = fast(u, lengths)
    assert with_kernel.dtype == without.dtype == dtype
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(with_kernel, without, atol=10 * atol, rtol=10 * rtol)
