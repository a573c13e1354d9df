"""The region-chunked and masked-dense fine levels of BiLevelRoutingAttention (BiFormer, Zhu et
al., CVPR 2023) against a float64 token-loop reference and the official-style gather code.

``_naive`` below computes, for image-order ``q, k, v`` ``[B, H, W, C]``, each region's
attention over the tokens of its routed regions with an explicit softmax in float64.
``gather_bra`` is the benchmark's re-implementation of the official ``ops/bra_legacy.py``
forward (divisible sizes, hard routing).
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path

import pytest
import torch

import core_attention.layers._region_attention as ra
from core_attention.layers._region_attention import (
    region_attention,
    region_rows_attention,
    use_dense,
)
from core_attention.layers.bilevel_routing import BiLevelRoutingAttention

_BENCH = Path(__file__).resolve().parents[2] / "packages/core_attention/bench"


def _gather_bra():
    if "bench_bilevel_routing" not in sys.modules:
        sys.path.insert(0, str(_BENCH))
        spec = importlib.util.spec_from_file_location(
            "bench_bilevel_routing", _BENCH / "bench_bilevel_routing.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_bilevel_routing"] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_bilevel_routing"].gather_bra


def _naive(q, k, v, idx, n, m, scale, key_valid=None):
    """Float64 reference on image-order tensors; rows without a valid key give zeros."""
    q, k, v = q.double(), k.double(), v.double()
    b, hp, wp, _ = q.shape
    h, w = hp // n, wp // n

    def region(t, bi, r):  # tokens of region r, row-major: [h * w, C]
        y, x = (r // n) * h, (r % n) * w
        return t[bi, y : y + h, x : x + w].reshape(h * w, -1)

    out = torch.zeros(b, hp, wp, v.shape[-1], dtype=torch.float64)
    rows = []
    for bi, r in itertools.product(range(b), range(n * n)):
        routed = [int(t) for t in idx[bi, r]]
        kk = torch.cat([region(k, bi, t) for t in routed])
        vv = torch.cat([region(v, bi, t) for t in routed])
        valid = torch.ones(kk.shape[0], dtype=torch.bool)
        if key_valid is not None:
            valid = torch.cat([key_valid[t] for t in routed])
        heads = []
        for hd in range(m):
            dq, dv = kk.shape[1] // m, vv.shape[1] // m
            s = region(q, bi, r)[:, hd * dq : (hd + 1) * dq] @ kk[:, hd * dq : (hd + 1) * dq].T
            s = (s * scale).masked_fill(~valid, float("-inf"))
            heads.append(torch.softmax(s, -1).nan_to_num(0.0) @ vv[:, hd * dv : (hd + 1) * dv])
        rows.append((bi, r, torch.cat(heads, -1)))
    for bi, r, o in rows:
        y, x = (r // n) * h, (r % n) * w
        out[bi, y : y + h, x : x + w] = o.view(h, w, -1)
    return out


def _inputs(b, n, h, w, qk, dim, topk, dtype=torch.float64, mask=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n * h, n * w, qk, generator=g, dtype=dtype)
    k = torch.randn(b, n * h, n * w, qk, generator=g, dtype=dtype)
    v = torch.randn(b, n * h, n * w, dim, generator=g, dtype=dtype)
    idx = torch.stack([torch.randperm(n * n, generator=g)[:topk] for _ in range(b * n * n)])
    idx = idx.view(b, n * n, topk)
    key_valid = None
    if mask:
        key_valid = torch.rand(n * n, h * w, generator=g) > 0.3
        key_valid[:, 0] = True
    return q, k, v, idx, key_valid


# (n_win, region h, region w, heads, topk): odd region sizes; topk * 4 < n^2 or regions of
# more than 16 tokens is the chunked path, the others the masked dense one.
CASES = [
    (3, 3, 2, 2, 1),
    (3, 2, 3, 2, 2),
    (4, 3, 1, 1, 3),
    (3, 1, 3, 2, 3),
    (2, 2, 3, 2, 4),
    (2, 5, 4, 2, 3),
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("tiny_chunks", [False, True])
def test_region_attention_matches_naive(case, mask, tiny_chunks, monkeypatch):
    n, h, w, m, topk = case
    if tiny_chunks:
        monkeypatch.setattr(ra, "_CHUNK_ELEMS", 1)  # one query region per chunk
    q, k, v, idx, valid = _inputs(2, n, h, w, 4 * m, 2 * m, topk, mask=mask)
    expected = _naive(q, k, v, idx, n, m, 0.6, valid)
    out = region_attention(q, k, v, idx, n_win=n, num_heads=m, scale=0.6, key_valid=valid)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    f = (q.float(), k.float(), v.float())
    out32 = region_attention(*f, idx, n_win=n, num_heads=m, scale=0.6, key_valid=valid)
    torch.testing.assert_close(out32.double(), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("mask", [False, True])
def test_region_attention_gradients_match_naive(case, mask, monkeypatch):
    n, h, w, m, topk = case
    monkeypatch.setattr(ra, "_CHUNK_ELEMS", 40)  # several chunks
    q, k, v, idx, valid = _inputs(2, n, h, w, 2 * m, 3 * m, topk, mask=mask, seed=1)
    g = torch.randn(2, n * h, n * w, 3 * m, dtype=torch.float64)
    ours = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = region_attention(*ours, idx, n_win=n, num_heads=m, scale=0.8, key_valid=valid)
    (out * g).sum().backward()
    (_naive(*ref, idx, n, m, 0.8, valid) * g).sum().backward()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("topk", [1, 2, 4])
def test_region_attention_gradcheck(topk, monkeypatch):
    monkeypatch.setattr(ra, "_CHUNK_ELEMS", 30)
    q, k, v, idx, valid = _inputs(1, 3, 2, 1, 2, 2, topk, mask=True, seed=2)
    inputs = [t.requires_grad_(True) for t in (q, k, v)]

    def fn(q, k, v):
        return region_attention(q, k, v, idx, n_win=3, num_heads=1, scale=0.9, key_valid=valid)

    assert torch.autograd.gradcheck(fn, inputs)


def test_dense_choice():
    assert not use_dense(1, 7, 4) and not use_dense(4, 7, 4) and use_dense(16, 7, 4)
    assert not use_dense(16, 7, 64)  # BiFormer-T's first stage with topk 16: routed


@pytest.mark.parametrize(("n", "h", "w", "m", "topk"), [(3, 3, 2, 2, 1), (4, 2, 3, 2, 3)])
@pytest.mark.parametrize("tiny_chunks", [False, True])
def test_region_rows_attention_matches_naive(n, h, w, m, topk, tiny_chunks, monkeypatch):
    if tiny_chunks:
        monkeypatch.setattr(ra, "_CHUNK_ELEMS", 1)
    g = torch.Generator().manual_seed(3)
    b, c, qk, dim = 2, 5, 2 * m, 3 * m
    x = torch.randn(b, n * h, n * w, c, generator=g, dtype=torch.float64)
    wq = torch.randn(qk, c, generator=g, dtype=torch.float64)
    bq = torch.randn(qk, generator=g, dtype=torch.float64)
    _, k, v, idx, _ = _inputs(b, n, h, w, qk, dim, topk, seed=4)
    base = torch.randn(b, n * h, n * w, dim, generator=g, dtype=torch.float64)

    def regions(t):  # image order -> [B * P, M, h * w, d]
        t = t.view(b, n, h, n, w, m, -1).permute(0, 1, 3, 5, 2, 4, 6)
        return t.reshape(b * n * n, m, h * w, -1)

    q = x @ wq.T + bq
    expected = base + _naive(q, k, v, idx, n, m, 0.7)
    out = region_rows_attention(
        x, wq, bq, regions(k), regions(v), idx, base.clone(), n_win=n, scale=0.7
    )
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def _randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3 if p.dim() == 1 else p[0].numel() ** -0.5)


# (dim, heads, n_win, topk, side_dwconv, H, W): region sizes 3x2, 2x5, 2x5, 4x4, 1x1, 1x2 (a
# LePE halo taller than a region: not the band path), 4x4;
# LePE halos of 1 and 2 rows; topk * 4 < n^2 (chunked) and not (masked dense).
MODULE_CASES = [
    (16, 2, 3, 1, 3, 9, 6),
    (16, 2, 4, 2, 5, 8, 20),
    (24, 3, 3, 2, 3, 6, 15),
    (16, 2, 4, 3, 5, 16, 16),
    (16, 2, 3, 3, 3, 3, 3),
    (16, 2, 4, 2, 5, 4, 8),
    (16, 4, 2, 2, 5, 8, 8),
]


@pytest.mark.parametrize("case", MODULE_CASES, ids=str)
def test_module_paths_match_gather_reference_float64(case):
    """Inference (band pass, LePE by bands) and training paths against the official-style
    gather forward, in float64 on fresh random weights and inputs."""
    dim, m, n, topk, side, hgt, wid = case
    mod = BiLevelRoutingAttention(dim, num_heads=m, n_win=n, topk=topk, side_dwconv=side)
    _randomize(mod)
    mod = mod.double()
    x = torch.randn(2, hgt, wid, dim, dtype=torch.float64)
    gather_bra = _gather_bra()
    with torch.no_grad():
        expected = gather_bra(mod, x)
        lean = mod(x)
    train = mod(x.clone().requires_grad_(True))
    torch.testing.assert_close(lean, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(train, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("case", MODULE_CASES[:4], ids=str)
def test_hard_routing_gradients_match_gather_reference(case):
    dim, m, n, topk, side, hgt, wid = case
    mod = BiLevelRoutingAttention(dim, num_heads=m, n_win=n, topk=topk, side_dwconv=side)
    _randomize(mod)
    mod = mod.double()
    gather_bra = _gather_bra()
    x = torch.randn(2, hgt, wid, dim, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    g = torch.randn(2, hgt, wid, dim, dtype=torch.float64)
    (mod(x) * g).sum().backward()
    ours = {name: p.grad.clone() for name, p in mod.named_parameters()}
    mod.zero_grad(set_to_none=True)
    (gather_bra(mod, x_ref) * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-10, rtol=1e-10)
    for name, p in mod.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-10, rtol=1e-10)


def test_lean_path_without_lepe_matches_training_path():
    mod = BiLevelRoutingAttention(16, num_heads=2, n_win=3, topk=1, side_dwconv=0)
    _randomize(mod)
    x = torch.randn(3, 6, 9, 16)
    with torch.no_grad():
        lean = mod(x)
    torch.testing.assert_close(lean, mod(x), atol=1e-5, rtol=1e-5)
