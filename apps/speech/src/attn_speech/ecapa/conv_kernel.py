"""Compiled CPU kernel for time-major 1-D convolutions, for
:class:`~attn_speech.ecapa.time_conv.TimeConv` (the TDNN layers of ECAPA-TDNN, Desplanques
et al. 2020).

``y[b, t] = act(bias + sum_j x[b, t + j d] W_j)`` for an input ``x`` ``[B, T + (k - 1) d,
C_in]`` that already holds its padding, ``W_j`` ``[C_in, N]`` the ``j``-th of the ``k`` taps,
``act`` the identity or ReLU. Every layer of ECAPA-TDNN is such a product of a few thousand
rows by a weight matrix of a few MiB, so the kernel is a register-blocked matrix product:

* a tile is 6 output rows by 64 output channels (four 16-lane vectors), 24 accumulators
  that stay in registers while the kernel walks the taps and input channels, each step one
  load of 64 weights and 6 broadcast inputs for 24 fused multiply-adds;
* the weights are packed once (:func:`pack_weight`) into panels of 64 output channels,
  ``[k][C_in][64]``, which each tile reads in order; the inputs at most 1024 channels at a
  time, so that a panel's slice (256 KiB) stays in L2 while every row tile of the layer
  passes over it;
* a work item is one tile; items are ordered panel by panel, and thread ``i`` of ``n``
  takes the ``i``-th of ``n`` equal runs of them: each thread reads its own panels (the
  weights cross the memory bus once) and all rows, or, for layers of one panel, its own
  rows.

Measured with ``python apps/speech/bench/bench_ecapa_layers.py`` on two Zen 5 cores (each
with a fused multiply-add peak of 134 GMAC/s), weights and inputs coming from memory as in
the network: 227-247 GMAC/s on the C=1024 network's large layers at two threads, 1.00-1.11x
oneDNN's time, and 116-125 GMAC/s at one thread.

The C++ source is compiled on first use by :class:`core_attention.native.NativeLibrary`;
:func:`supports` is False where there is no compiler or the build fails, and on CPUs
without AVX-512 (:data:`WIDE_REGISTERS`: with sixteen 256-bit registers the tiles spill),
and :class:`~attn_speech.ecapa.time_conv.TimeConv` then takes oneDNN or PyTorch. Inference only:
no gradients. Float32 and float64 (the tests' reference precision).

Shapes: ``x`` ``[B, T + (k - 1) d, C_in]`` (unit stride along ``C_in``); the weights
``[N, C_in, k]`` (``nn.Conv1d``'s), ``N`` a multiple of 16; ``bias`` ``[N]`` or ``[B, N]``
(one per item); the result ``[B, T, N]``.
"""

from __future__ import annotations

import ctypes

import torch

from core_attention.native import BLOCK, NativeLibrary

__all__ = [
    "MAX_TAPS",
    "PANEL",
    "PASS_CHANNELS",
    "ROWS",
    "WIDE_REGISTERS",
    "available",
    "build_error",
    "conv",
    "pack_weight",
    "supports",
]

TILES = r"""
namespace {

constexpr int64_t ROWS = 6;       // output rows per tile
constexpr int64_t PANEL = 64;     // output channels per tile (4 vectors)
constexpr int64_t KC = 1024;      // input channels per pass over a panel
constexpr int64_t MAX_TAPS = 8;

// x in every lane, one broadcast: x - 0 is x for every x, so the subtraction folds away
// (V{} + x would not: -0 + 0 is +0)
template <typename V, typename T>
inline V splat(T x) {
    return x - V{};
}

// One R x (NB * 16) tile over kc input channels of every tap: acc starts from init (rows
// it apart; 0: the bias for every row) and is written to y, through a ReLU when relu.
// a[j * R + r] points at input row r of tap j, at the first of the kc channels; w at the
// panel's first of them, taps wtap apart.
template <typename T, typename V, int R, int NB>
void tile(const T* const* a, int64_t taps, int64_t kc, const T* w, int64_t wtap,
          const T* init, int64_t it, T* y, int64_t yt, bool relu) {
    V acc[R][NB];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < NB; ++c) acc[r][c] = load<V>(init + r * it + c * BLOCK, BLOCK);
    for (int64_t j = 0; j < taps; ++j) {
        const T* wj = w + j * wtap;
        const T* aj[R];
        for (int r = 0; r < R; ++r) aj[r] = a[j * R + r];
        for (int64_t k = 0; k < kc; ++k) {
            V b[NB];
            for (int c = 0; c < NB; ++c) b[c] = load<V>(wj + (k * NB + c) * BLOCK, BLOCK);
            for (int r = 0; r < R; ++r) {
                const V s = splat<V>(aj[r][k]);
                for (int c = 0; c < NB; ++c) acc[r][c] += s * b[c];
            }
        }
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < NB; ++c) {
            V v = acc[r][c];
            if (relu) v = v > T(0) ? v : V{};
            store(y + r * yt + c * BLOCK, v, BLOCK);
        }
}

template <typename T, typename V>
using TileFn = void (*)(const T* const*, int64_t, int64_t, const T*, int64_t, const T*,
                        int64_t, T*, int64_t, bool);

template <typename T, typename V, int R>
TileFn<T, V> tile_of_width(int64_t nb) {
    switch (nb) {
        case 1: return tile<T, V, R, 1>;
        case 2: return tile<T, V, R, 2>;
        case 3: return tile<T, V, R, 3>;
        default: return tile<T, V, R, 4>;
    }
}

template <typename T, typename V>
TileFn<T, V> tile_of(int64_t rows, int64_t nb) {
    switch (rows) {
        case 1: return tile_of_width<T, V, 1>(nb);
        case 2: return tile_of_width<T, V, 2>(nb);
        case 3: return tile_of_width<T, V, 3>(nb);
        case 4: return tile_of_width<T, V, 4>(nb);
        case 5: return tile_of_width<T, V, 5>(nb);
        default: return tile_of_width<T, V, 6>(nb);
    }
}

}  // namespace
"""

_SOURCE = (
    TILES
    + r"""
extern "C" {

// y[b, t, n] = act(bias[b, n] + sum_{j < taps} sum_{k < Cin} x[b, t + j dil, k] W[j, k, n])
// for t < T, W packed in panels of PANEL output channels (the last one 16, 32 or 48 wide
// when N is not a multiple of PANEL), each [taps][Cin][width]. Rows have unit stride.
struct ConvArgs {
    int64_t B, T, Cin, N, taps, dil;
    const void* x; int64_t xs, xt;
    const void* w;
    const void* bias; int64_t bias_s;
    void* y; int64_t ys, yt;
    int64_t relu;
};

}

namespace {

// Items [i0, i1): item i is row tile i % (B * tiles) of panel i / (B * tiles). A run of
// one panel's items passes over the panel KC input channels at a time.
template <typename T, typename V>
void conv_items(const ConvArgs& g, int64_t i0, int64_t i1) {
    const int64_t tiles = (g.T + ROWS - 1) / ROWS, per_panel = g.B * tiles;
    const T* x = (const T*)g.x;
    const T* w = (const T*)g.w;
    const T* bias = (const T*)g.bias;
    T* y = (T*)g.y;
    const T* rows[ROWS * MAX_TAPS];
    for (int64_t i = i0; i < i1;) {
        const int64_t p = i / per_panel;
        const int64_t end = (p + 1) * per_panel < i1 ? (p + 1) * per_panel : i1;
        const int64_t n0 = p * PANEL;
        const int64_t width = g.N - n0 < PANEL ? g.N - n0 : PANEL;
        const T* panel = w + n0 * g.taps * g.Cin;
        for (int64_t k0 = 0; k0 < g.Cin; k0 += KC) {
            const int64_t kc = g.Cin - k0 < KC ? g.Cin - k0 : KC;
            const bool last = k0 + kc >= g.Cin;
            for (int64_t item = i; item < end; ++item) {
                // tiles of T / tiles rows, 5 or 6 for T = 500, not 83 of 6 and one of 2
                const int64_t b = item % per_panel / tiles, k = item % tiles;
                const int64_t t0 = k * g.T / tiles, r = (k + 1) * g.T / tiles - t0;
                for (int64_t j = 0; j < g.taps; ++j)
                    for (int64_t q = 0; q < r; ++q)
                        rows[j * r + q] = x + b * g.xs + (t0 + q + j * g.dil) * g.xt + k0;
                T* out = y + b * g.ys + t0 * g.yt + n0;
                const T* init = k0 == 0 ? bias + b * g.bias_s + n0 : out;
                tile_of<T, V>(r, width / BLOCK)(rows, g.taps, kc, panel + k0 * width,
                                                g.Cin * width, init, k0 == 0 ? 0 : g.yt, out,
                                                g.yt, g.relu && last);
            }
        }
        i = end;
    }
}

}  // namespace

EXPORT_RUNS(conv, ConvArgs, conv_items)
"""
)

PANEL = 64  # output channels per packed panel (PANEL in the source)
MAX_TAPS = 8  # MAX_TAPS in the source
ROWS = 6  # output rows per tile (ROWS in the source)
PASS_CHANNELS = 1024  # input channels per pass over a panel (KC in the source)
# multiply-adds below which one thread runs
_SHARED_WORK = 1 << 16

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class _ConvArgs(ctypes.Structure):
    _fields_ = [
        ("B", _i64), ("T", _i64), ("Cin", _i64), ("N", _i64), ("taps", _i64), ("dil", _i64),
        ("x", _ptr), ("xs", _i64), ("xt", _i64),
        ("w", _ptr),
        ("bias", _ptr), ("bias_s", _i64),
        ("y", _ptr), ("ys", _i64), ("yt", _i64),
        ("relu", _i64),
    ]  # fmt: skip


_LIBRARY = NativeLibrary("time_conv", _SOURCE, {"conv": _ConvArgs})

available = _LIBRARY.available  # whether the kernel builds and loads (built on first call)
build_error = _LIBRARY.build_error  # why it does not, if it does not


# The tiles hold 24 accumulators of 16 lanes and their operands in registers: AVX-512's 32
# registers of 512 bits. With 256-bit vectors (16 registers) they spill and oneDNN is faster.
WIDE_REGISTERS = torch.backends.cpu.get_cpu_capability() == "AVX512"


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether layers should take the kernel for input ``x`` and weights ``weight`` ``[N,
    C_in, k]``: a CPU with AVX-512 (:data:`WIDE_REGISTERS`), float32/float64, ``N`` a
    multiple of 16, at most :data:`MAX_TAPS` taps, no tracer, the library available.
    (:func:`conv` itself runs on any CPU the library builds for.)"""
    n, _, taps = weight.shape
    return WIDE_REGISTERS and n % BLOCK == 0 and taps <= MAX_TAPS and _LIBRARY.takes(x)


def pack_weight(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[N, C_in, k]`` weights as the kernel reads them: panels of :data:`PANEL` output
    channels, each ``[k][C_in][width]``, one flat contiguous tensor."""
    weight = weight.detach().to(dtype or weight.dtype)
    n = weight.shape[0]
    if n % BLOCK:
        raise ValueError(f"output channels ({n}) must be a multiple of {BLOCK}")
    panels = [weight[n0 : n0 + PANEL].permute(2, 1, 0).reshape(-1) for n0 in range(0, n, PANEL)]
    return torch.cat(panels).contiguous()


def conv(
    x: torch.Tensor,
    packed: torch.Tensor,
    out_channels: int,
    taps: int,
    dilation: int,
    bias: torch.Tensor,
    relu: bool,
) -> torch.Tensor:
    """``act(conv1d(x))`` time-major: ``x`` ``[B, T + (taps - 1) dilation, C_in]`` (unit
    stride along ``C_in``), ``packed`` from :func:`pack_weight`, ``bias`` ``[N]`` or ``[B,
    N]`` -> ``[B, T, N]``."""
    b, rows, cin = x.shape
    t = rows - (taps - 1) * dilation
    dtype = x.dtype
    if t < 1 or x.stride(2) != 1:
        raise ValueError(f"x {tuple(x.shape)} needs unit stride along C and more rows than taps")
    if packed.dtype != dtype or packed.numel() != out_channels * cin * taps:
        raise ValueError(f"packed weights are not {out_channels} x {cin} x {taps} {dtype}")
    if not 1 <= taps <= MAX_TAPS or out_channels % BLOCK:
        raise ValueError(f"{taps} taps, {out_channels} outputs: not supported")
    bias = bias.to(dtype)
    if bias.shape == (out_channels,):
        bias_stride = 0
    elif bias.shape == (b, out_channels):
        bias_stride = bias.stride(0)
    else:
        raise ValueError(f"bias must be [{out_channels}] or [{b}, {out_channels}]")
    if bias.stride(-1) != 1:
        bias = bias.contiguous()
        bias_stride = bias.stride(0) if bias.dim() == 2 else 0
    y = x.new_empty(b, t, out_channels)
    args = _ConvArgs(
        b, t, cin, out_channels, taps, dilation,
        x.data_ptr(), x.stride(0), x.stride(1),
        packed.data_ptr(),
        bias.data_ptr(), bias_stride,
        y.data_ptr(), y.stride(0), y.stride(1),
        int(relu),
    )  # fmt: skip
    items = -(-out_channels // PANEL) * b * -(-t // ROWS)
    _LIBRARY.run("conv", dtype, args, items, b * t * cin * taps * out_channels, _SHARED_WORK)
    return y
