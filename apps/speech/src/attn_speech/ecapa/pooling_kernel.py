"""Compiled CPU kernel for the statistics of attentive statistics pooling (Okabe et al. 2018,
"Attentive Statistics Pooling for Deep Speaker Embedding"; ECAPA-TDNN's channel-dependent
attention with global context, Desplanques et al. 2020), for
:class:`~attn_speech.ecapa.fast_pooling.FastAttentivePooling`.

Both statistics the pooling needs are per-channel weighted means and standard deviations
over the valid frames of ``u`` ``[B, T, C]``, reported for ``x = a u + b``:

* :func:`mean_std`: uniform weights (the global context, ``[mean; std]`` of ``x``);
* :func:`attentive_mean_std`: weights ``softmax_t(scores)`` per channel (the pooled
  output), the scores ``h W^T + bias`` of the 1x1 scoring layer computed in the same pass,
  32 frames x 64 channels at a time, and never written out (writing and reading back the
  ``[B, T, C]`` scores cost more than computing them).

One pass over the inputs replaces PyTorch's chain of full-size temporaries (max, subtract,
exp, products, sums): a work item is a block of 16 channels of one batch row, vectorised
over channels (unit stride along ``C``), walking time in chunks of 32 frames that stay in
L1. ``u`` is shifted by the block's first frame and each chunk by its own references (its
largest score, its weighted mean), so there is no cancellation; chunks are merged with the
pairwise update of Chan, Golub & LeVeque (1979), the softmax weights rescaled whenever the
running maximum grows (the online softmax of Milakov & Gimelshein 2018). Chunks accumulate
in the input's precision, their merge in float64. Float32 uses a polynomial ``exp`` (about
1 ulp), float64 the C library.

The C++ source is compiled on first use by :class:`core_attention.native.NativeLibrary`;
:func:`available` is False where there is no compiler or the build fails, and callers then
use their PyTorch code. Inference only: no gradients.

Shapes: ``u`` ``[B, T, C]``, ``h`` ``[B, T, K]`` (unit stride along the last dimension);
``a``, ``b`` ``[C]``; the scoring layer as :func:`pack_scorer` packs it;
``frames`` ``[B]`` valid frames (``None``: all ``T``); results ``[B, 2C]`` (means, then
standard deviations ``sqrt(max(a^2 var, eps))``).
"""

from __future__ import annotations

import ctypes

import torch

from core_attention.native import BLOCK, NativeLibrary, addr, unit_stride_last

__all__ = [
    "attentive_mean_std",
    "available",
    "build_error",
    "mean_std",
    "pack_scorer",
    "padded_width",
    "supports",
]

_SOURCE = r"""
extern "C" {

// Weighted statistics over the first frames[i] (all T when frames is null) rows of u
// [B, T, C] (unit stride along C): weights uniform (mean_std) or softmax over time per
// channel of the scores (attentive) scores[t, c] = sum_k h[t, k] wt[k, c] + bias[c], h
// [B, T, K] (unit stride along K), wt [K, ws] and bias [ws] zero beyond C, ws >= C + 48
// (whole groups). out [B, 2C] = [a m + b, sqrt(max(a^2 v, eps))] with m, v the weighted
// mean and variance of u.
struct StatsArgs {
    int64_t T, C;
    const void* u; int64_t us, ut;
    const int64_t* frames;
    const void* a; const void* b;
    double eps;
    void* out;
    const void* h; int64_t hs, ht, K;
    const void* wt; int64_t ws;
    const void* bias;
};

}

namespace {

constexpr int64_t CHUNK = 32;

template <typename V>
inline V vmax(V x, V y) { return x > y ? x : y; }

inline vd widen(vf x) { return __builtin_convertvector(x, vd); }
inline vd widen(vd x) { return x; }

// Sum of f(r) over r < rows in four independent chains (one chain waits on the add latency).
template <typename V, typename F>
inline V sum_rows(int64_t rows, F f) {
    V acc[4] = {};
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4)
        for (int q = 0; q < 4; ++q) acc[q] += f(r + q);
    for (; r < rows; ++r) acc[0] += f(r);
    return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// Running statistics of one block of channels; add() folds in one chunk of rows.
template <typename T, typename V, bool SOFTMAX>
struct Block {
    // total weight, mean - ref, weighted squared deviations; largest score so far; ref: the
    // block's first frame, so that chunk means are small numbers (no rounding of a large
    // common offset into the spread between chunks)
    vd weight = {}, mean = {}, m2 = {};
    V top = {}, ref = {};

    // FULL: all 16 lanes (w = BLOCK known to the compiler: plain vector loads)
    template <bool FULL>
    void add(const T* u, int64_t ut, const T* s, int64_t st, int64_t rows, int64_t width,
             bool first) {
        const int64_t w = FULL ? BLOCK : width;
        if (first) ref = load<V>(u, w);
        const auto x = [&](int64_t r) { return load<V>(u + r * ut, w) - ref; };
        V e[CHUNK];
        V wc, sum, peak = {};
        if (SOFTMAX) {
            peak = load<V>(s, w);
            for (int64_t r = 1; r < rows; ++r) peak = vmax(peak, load<V>(s + r * st, w));
            for (int64_t r = 0; r < rows; ++r) e[r] = vexp(load<V>(s + r * st, w) - peak);
            wc = sum_rows<V>(rows, [&](int64_t r) { return e[r]; });
            sum = sum_rows<V>(rows, [&](int64_t r) { return e[r] * x(r); });
        } else {
            wc = V{} + (T)rows;
            sum = sum_rows<V>(rows, x);
        }
        const V mc = sum / wc;
        const V dev = sum_rows<V>(rows, [&](int64_t r) {
            const V d = x(r) - mc;
            return SOFTMAX ? e[r] * d * d : d * d;
        });
        vd wnew = widen(wc), mnew = widen(mc), m2new = widen(dev);
        if (first) {
            weight = wnew, mean = mnew, m2 = m2new, top = peak;
            return;
        }
        if (SOFTMAX) {  // both sides relative to the larger maximum
            const V hi = vmax(top, peak);
            const vd keep = widen(vexp(top - hi)), scale = widen(vexp(peak - hi));
            weight *= keep, m2 *= keep, wnew *= scale, m2new *= scale;
            top = hi;
        }
        const vd total = weight + wnew, delta = mnew - mean;
        mean += delta * (wnew / total);
        m2 += m2new + delta * delta * (weight * wnew / total);
        weight = total;
    }
};

template <typename T>
inline void prefetch_rows(const T* p, int64_t stride, int64_t rows, int64_t bytes) {
    for (int64_t r = 0; r < rows; ++r) {
        const char* row = (const char*)(p + r * stride);
        for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(row + o);
    }
}

// Items (blocks of 16 channels of one batch row) are taken GROUP adjacent blocks at a time,
// chunk by chunk, so that each row is read 256 contiguous bytes at a time, not 64.
constexpr int64_t GROUP = 4;
constexpr int64_t TILE_ROWS = 4;  // x GROUP vectors: 16 accumulators in registers

// The scores of rows [0, rows) x GROUP blocks: out[r * GROUP * BLOCK + c] for c < GROUP
// BLOCK, from h rows (stride ht, K columns), wt (row stride ws) and bias, all at the group's
// first channel.
template <typename T, typename V>
void score_tile(const T* h, int64_t ht, int64_t K, const T* wt, int64_t ws, const T* bias,
                int64_t rows, T* out) {
    for (int64_t r = 0; r < rows; r += TILE_ROWS) {
        const T* hr[TILE_ROWS];
        for (int q = 0; q < TILE_ROWS; ++q)  // a short last tile repeats its last row
            hr[q] = h + (r + q < rows ? r + q : rows - 1) * ht;
        V acc[TILE_ROWS][GROUP];
        for (int j = 0; j < GROUP; ++j) {
            const V b0 = load<V>(bias + j * BLOCK, BLOCK);
            for (int q = 0; q < TILE_ROWS; ++q) acc[q][j] = b0;
        }
        for (int64_t k = 0; k < K; ++k) {
            V w[GROUP];
            for (int j = 0; j < GROUP; ++j) w[j] = load<V>(wt + k * ws + j * BLOCK, BLOCK);
            for (int q = 0; q < TILE_ROWS; ++q) {
                const T x = hr[q][k];
                for (int j = 0; j < GROUP; ++j) acc[q][j] += x * w[j];
            }
        }
        for (int q = 0; q < TILE_ROWS && r + q < rows; ++q)
            for (int j = 0; j < GROUP; ++j)
                store(out + (r + q) * GROUP * BLOCK + j * BLOCK, acc[q][j], BLOCK);
    }
}

// SOFTMAX: weights softmax_t of the scores computed from h; else uniform.
template <typename T, typename V, bool SOFTMAX>
void stats_items(const StatsArgs& a, int64_t item0, int64_t item1) {
    const int64_t C = a.C, blocks = (C + BLOCK - 1) / BLOCK;
    Block<T, V, SOFTMAX> stats[GROUP];
    alignas(64) T tile[SOFTMAX ? CHUNK * GROUP * BLOCK : 1];
    for (int64_t g0 = item0; g0 < item1;) {
        const int64_t i = g0 / blocks, first = g0 % blocks;
        int64_t g1 = g0 + GROUP < item1 ? g0 + GROUP : item1;
        g1 = g1 < (i + 1) * blocks ? g1 : (i + 1) * blocks;
        const int64_t n = a.frames ? a.frames[i] : a.T;
        const T* u = (const T*)a.u + i * a.us;
        for (int64_t t0 = 0; t0 < n; t0 += CHUNK) {
            const int64_t rows = n - t0 < CHUNK ? n - t0 : CHUNK;
            // the next chunk: u's rows are C apart (12 KiB at C = 3072), each read 64 channels
            // wide, beyond the reach of the hardware prefetchers
            const int64_t ahead = n - t0 - CHUNK < CHUNK ? n - t0 - CHUNK : CHUNK;
            prefetch_rows(u + (t0 + CHUNK) * a.ut + first * BLOCK, a.ut, ahead,
                          (g1 - g0) * BLOCK * (int64_t)sizeof(T));
            if (SOFTMAX) {
                const int64_t c0 = first * BLOCK;
                score_tile<T, V>((const T*)a.h + i * a.hs + t0 * a.ht, a.ht, a.K,
                                 (const T*)a.wt + c0, a.ws, (const T*)a.bias + c0, rows, tile);
            }
            for (int64_t j = 0; j < g1 - g0; ++j) {
                const int64_t c0 = (first + j) * BLOCK, w = C - c0 < BLOCK ? C - c0 : BLOCK;
                const T* uc = u + t0 * a.ut + c0;
                const T* sc = SOFTMAX ? tile + j * BLOCK : nullptr;
                const int64_t st = GROUP * BLOCK;
                if (w == BLOCK)
                    stats[j].template add<true>(uc, a.ut, sc, st, rows, w, t0 == 0);
                else
                    stats[j].template add<false>(uc, a.ut, sc, st, rows, w, t0 == 0);
            }
        }
        for (int64_t j = 0; j < g1 - g0; ++j) {
            const int64_t c0 = (first + j) * BLOCK, w = C - c0 < BLOCK ? C - c0 : BLOCK;
            const T* sa = (const T*)a.a + c0;
            const T* sb = (const T*)a.b + c0;
            T* out = (T*)a.out + i * 2 * C + c0;
            for (int64_t k = 0; k < w; ++k) {
                const double var = stats[j].m2[k] / stats[j].weight[k], g = sa[k];
                const double v = g * g * var;
                out[k] = (T)(g * (stats[j].ref[k] + stats[j].mean[k]) + sb[k]);
                out[C + k] = (T)std::sqrt(v > a.eps ? v : a.eps);
            }
        }
        g0 = g1;
    }
}

}  // namespace

EXPORT_PARALLEL(mean_std, StatsArgs, stats_items, false)
EXPORT_PARALLEL(attentive, StatsArgs, stats_items, true)
"""

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class _StatsArgs(ctypes.Structure):
    _fields_ = [
        ("T", _i64), ("C", _i64),
        ("u", _ptr), ("us", _i64), ("ut", _i64),
        ("frames", _ptr),
        ("a", _ptr), ("b", _ptr),
        ("eps", ctypes.c_double),
        ("out", _ptr),
        ("h", _ptr), ("hs", _i64), ("ht", _i64), ("K", _i64),
        ("wt", _ptr), ("ws", _i64),
        ("bias", _ptr),
    ]  # fmt: skip


_LIBRARY = NativeLibrary(
    "attentive_pooling",
    _SOURCE,
    {"mean_std": _StatsArgs, "attentive": _StatsArgs},
)


available = _LIBRARY.available  # whether the kernel builds and loads (built on first call)
build_error = _LIBRARY.build_error  # why it does not, if it does not
supports = _LIBRARY.takes  # whether it takes these tensors (CPU float32/float64, no tracer)


def _statistics(
    name: str,
    u: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    eps: float,
    frames: torch.Tensor | None,
    scorer: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    if not available():
        raise RuntimeError(f"the attentive pooling kernel is not available: {build_error()}")
    dtype = u.dtype
    batch, t, c = u.shape
    if t < 1:
        raise ValueError("statistics over zero frames")
    u = unit_stride_last(u, dtype)
    h, wt, bias = scorer if scorer is not None else (None, None, None)
    if scorer is not None:
        if h.shape[:2] != u.shape[:2] or wt.shape[0] != h.shape[2]:
            raise ValueError(f"h {tuple(h.shape)}, wt {tuple(wt.shape)} and u {tuple(u.shape)}")
        if wt.shape[1] < padded_width(c) or bias.shape != wt.shape[1:]:
            raise ValueError(f"wt {tuple(wt.shape)}, bias {tuple(bias.shape)}: see pack_scorer")
        h = unit_stride_last(h, dtype)
        wt, bias = wt.to(dtype).contiguous(), bias.to(dtype).contiguous()
    if frames is not None:
        frames = frames.to(torch.int64).clamp(1, t).contiguous()
    a, b = (v.to(dtype).contiguous() for v in (a, b))
    out = torch.empty(batch, 2 * c, dtype=dtype)
    args = _StatsArgs(
        t, c,
        addr(u), u.stride(0), u.stride(1),
        addr(frames),
        addr(a), addr(b),
        float(eps),
        addr(out),
        addr(h), *(h.stride()[:2] if h is not None else (0, 0)), h.shape[2] if h is not None else 0,
        addr(wt), wt.shape[1] if wt is not None else 0,
        addr(bias),
    )  # fmt: skip
    k = h.shape[2] if h is not None else 0
    _LIBRARY.run(name, dtype, args, batch * -(-c // BLOCK), batch * t * c * (1 + k // 8))
    return out


def mean_std(
    u: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    eps: float,
    frames: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[mean; sqrt(max(var, eps))]`` over time of ``x = a u + b`` per channel, each batch
    row over its first ``frames`` frames: ``u`` ``[B, T, C]`` -> ``[B, 2C]``."""
    return _statistics("mean_std", u, a, b, eps, frames)


def padded_width(channels: int) -> int:
    """Columns of :func:`pack_scorer`'s weights for ``channels`` scores: whole 16-channel
    blocks plus three, so that a group of four blocks may start at any block."""
    return -(-channels // BLOCK) * BLOCK + 3 * BLOCK


def pack_scorer(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A scoring layer ``scores = h W^T + bias`` (``W`` ``[C, K]``, ``bias`` ``[C]``) as the
    zero-padded ``wt`` ``[K, padded_width(C)]`` and ``bias`` ``[padded_width(C)]`` that
    :func:`attentive_mean_std` reads."""
    c, k = weight.shape
    wt = weight.new_zeros(k, padded_width(c))
    wt[:, :c] = weight.T
    padded = bias.new_zeros(padded_width(c))
    padded[:c] = bias
    return wt, padded


def attentive_mean_std(
    h: torch.Tensor,
    wt: torch.Tensor,
    bias: torch.Tensor,
    u: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    eps: float,
    frames: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean and standard deviation of ``x = a u + b`` per channel, weighted over time by
    ``softmax_t(h W^T + bias)`` (each batch row over its first ``frames`` frames), the
    scores computed in the same pass: ``h`` ``[B, T, K]``, ``wt``, ``bias`` from
    :func:`pack_scorer`, ``u`` ``[B, T, C]`` -> ``[B, 2C]``."""
    return _statistics("attentive", u, a, b, eps, frames, (h, wt, bias))
