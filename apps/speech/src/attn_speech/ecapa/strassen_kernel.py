"""One level of Strassen's algorithm for large 1x1 time-major layers on the CPU, on the tiles
of :mod:`attn_speech.ecapa.conv_kernel`, for :class:`~attn_speech.ecapa.time_conv.TimeConv`
(ECAPA-TDNN's multi-layer aggregation, 3C -> 3C channels, is half of its products).

``y = act(x W^T + bias)`` for ``x`` ``[M, K]`` (the ``B T`` rows of ``[B, T, K]``), with ``x``
split into row and column halves ``A_ij`` and ``W^T`` into ``B_ij`` (``K/2 x N/2`` each),
computes the four quarters of ``y`` from seven half-size products instead of eight (Strassen
1969)::

    M1 = (A11 + A22)(B11 + B22)   M5 = (A11 + A12) B22
    M2 = (A21 + A22) B11          M6 = (A21 - A11)(B11 + B12)
    M3 = A11 (B12 - B22)          M7 = (A12 - A22)(B21 + B22)
    M4 = A22 (B21 - B11)
    C11 = M1 + M4 - M5 + M7   C12 = M3 + M5   C21 = M2 + M4   C22 = M1 - M2 + M3 + M6

so 7/8 of the multiply-adds. The seven weight combinations are packed once
(:func:`pack_products`), the seven panels of each 64-channel column adjacent. The sums of
input quarters are formed as the tiles read their inputs (the additions run beside the
multiply-adds), and the products' sums cost little: each thread owns 64-channel columns of
the four quarters and, for each, runs the seven products over all row tiles in turn, each
tile's product going from registers into the quarters it belongs to (with the bias where it
comes first, the ReLU where it comes last) while those outputs stay in the core's L2.

Measured on two Zen 5 cores, 3072 x 3072 (the C=1024 aggregation layer), against
:func:`attn_speech.ecapa.conv_kernel.conv`: 1.04-1.07x from 200 to 800 rows (the half-size
products run at about 93 % of the full product's rate, and 5 of the 7 read sums), 0.99x at
100 rows, 0.92x at 50, and no gain at 1536 x 1536; hence :func:`supports`' bounds. In the
network, 1-2.5 % of a file's time.

Rounding: the sums of inputs and of weights round once more than the plain product; the
largest error against float64 grows by half (9.5e-6 against 6.4e-6 on outputs up to 2.8,
3072 x 3072, 501 rows, float32), far inside float32 agreement with SpeechBrain.

The C++ source is compiled on first use by :class:`core_attention.native.NativeLibrary`;
:func:`supports` is False where there is no compiler or the build fails, and the layer then
runs as one product. Inference only: no gradients. Float32 and float64.

Shapes: ``x`` ``[B, T, K]`` contiguous, ``B T >= 2``; weights ``[N, K, 1]``, ``K`` even,
``N / 2`` a multiple of 64; ``bias`` ``[N]``; the result ``[B, T, N]``.
"""

from __future__ import annotations

import ctypes

import torch

from attn_speech.ecapa import conv_kernel
from core_attention.native import NativeLibrary

__all__ = ["available", "build_error", "pack_products", "strassen", "supports"]

_SOURCE = (
    conv_kernel.TILES
    + r"""
extern "C" {

// y [M, N] (rows yt apart) = act(x W^T + bias), x [M, 2 K2] (rows xt apart), from seven
// products of sums of x's quarters (rows [0, h) and [h, M), columns [0, K2) and [K2, 2 K2))
// and the seven packed weight combinations w, panel by panel ([N2 / 64][7][K2][64]);
// M - h <= h, the missing row of an odd M read from zero (K2 zeros).
struct StrassenArgs {
    int64_t M, h, K2, N2;
    const void* x; int64_t xt;
    const void* zero;
    const void* w;
    const void* bias;
    void* y; int64_t yt;
    int64_t relu;
};

}

namespace {

// Product p's inputs: quarters (0: A11, 1: A12, 2: A21, 3: A22) a and b, combined by OP.
constexpr int IN_A[7] = {0, 2, 0, 3, 0, 2, 1};
constexpr int IN_B[7] = {3, 3, 0, 3, 1, 0, 3};
constexpr int IN_OP[7] = {1, 1, 0, 0, 1, -1, -1};

// Where product p goes: quarter (0: C11, 1: C12, 2: C21, 3: C22) and sign, two at most.
constexpr int DEST[7][2] = {{0, 3}, {2, 3}, {1, 3}, {0, 2}, {0, 1}, {3, -1}, {0, -1}};
constexpr int SIGN[7][2] = {{1, 1}, {1, -1}, {1, 1}, {1, 1}, {-1, 1}, {1, 0}, {1, 0}};
// The product that writes a quarter first (adding the bias) and last (applying the ReLU).
constexpr int FIRST[4] = {0, 2, 1, 0};
constexpr int LAST[4] = {6, 4, 3, 5};

// Row q of x's quarter i (0: A11, 1: A12, 2: A21, 3: A22); the bottom half may be one row
// short (odd M), its last row then read from zero.
template <typename T>
inline const T* quarter_row(const StrassenArgs& g, int quarter, int64_t q) {
    const int64_t row = (quarter < 2 ? 0 : g.h) + q;
    if (row >= g.M) return (const T*)g.zero;
    return (const T*)g.x + row * g.xt + (quarter & 1) * g.K2;
}

// The product of R rows by a 64-channel panel over K2 inputs, each input the sum (OP = 1)
// or difference (OP = -1) of two quarters' entries, or one quarter's (OP = 0), into y [R][64].
// The sums are formed as the tile reads its inputs, never written out.
template <typename T, typename V, int R, int OP>
void pair_tile(const T* const* a, const T* const* b, int64_t K2, const T* w, T* y) {
    constexpr int NB = PANEL / BLOCK;
    V acc[R][NB] = {};
    for (int64_t k = 0; k < K2; ++k) {
        V wk[NB];
        for (int c = 0; c < NB; ++c) wk[c] = load<V>(w + (k * NB + c) * BLOCK, BLOCK);
        for (int r = 0; r < R; ++r) {
            const T v = OP == 0 ? a[r][k] : (OP > 0 ? a[r][k] + b[r][k] : a[r][k] - b[r][k]);
            const V sv = splat<V>(v);
            for (int c = 0; c < NB; ++c) acc[r][c] += sv * wk[c];
        }
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < NB; ++c) store(y + r * PANEL + c * BLOCK, acc[r][c], BLOCK);
}

template <typename T>
using PairFn = void (*)(const T* const*, const T* const*, int64_t, const T*, T*);

template <typename T, typename V, int OP>
PairFn<T> pair_of_rows(int64_t rows) {
    switch (rows) {
        case 1: return pair_tile<T, V, 1, OP>;
        case 2: return pair_tile<T, V, 2, OP>;
        case 3: return pair_tile<T, V, 3, OP>;
        case 4: return pair_tile<T, V, 4, OP>;
        case 5: return pair_tile<T, V, 5, OP>;
        default: return pair_tile<T, V, 6, OP>;
    }
}

template <typename T, typename V>
PairFn<T> pair_of(int64_t rows, int op) {
    return op == 0 ? pair_of_rows<T, V, 0>(rows)
                   : (op > 0 ? pair_of_rows<T, V, 1>(rows) : pair_of_rows<T, V, -1>(rows));
}

template <typename T, typename V>
void strassen_panels(const StrassenArgs& g, int64_t j0, int64_t j1) {
    const int64_t tiles = (g.h + ROWS - 1) / ROWS;
    const T* bias = (const T*)g.bias;
    T* y = (T*)g.y;
    alignas(64) T prod[ROWS * PANEL];
    const T* ra[ROWS];
    const T* rb[ROWS];
    for (int64_t j = j0; j < j1; ++j) {
        const int64_t n0 = j * PANEL;
        for (int p = 0; p < 7; ++p) {
            const T* w = (const T*)g.w + (j * 7 + p) * PANEL * g.K2;
            for (int64_t i = 0; i < tiles; ++i) {
                const int64_t t0 = i * g.h / tiles, r = (i + 1) * g.h / tiles - t0;
                for (int64_t q = 0; q < r; ++q) {
                    ra[q] = quarter_row<T>(g, IN_A[p], t0 + q);
                    rb[q] = quarter_row<T>(g, IN_B[p], t0 + q);
                }
                pair_of<T, V>(r, IN_OP[p])(ra, rb, g.K2, w, prod);
                for (int d = 0; d < 2 && DEST[p][d] >= 0; ++d) {
                    const int quarter = DEST[p][d];
                    const T sign = (T)SIGN[p][d];
                    const int64_t top = quarter < 2 ? 0 : g.h;
                    const int64_t col = (quarter & 1) * g.N2 + n0;
                    const int64_t valid = top + t0 + r <= g.M ? r : g.M - top - t0;
                    const bool first = FIRST[quarter] == p, last = LAST[quarter] == p;
                    for (int64_t q = 0; q < valid; ++q) {
                        T* out = y + (top + t0 + q) * g.yt + col;
                        for (int64_t c = 0; c < PANEL; c += BLOCK) {
                            V v = load<V>(prod + q * PANEL + c, BLOCK) * sign;
                            v += first ? load<V>(bias + col + c, BLOCK) : load<V>(out + c, BLOCK);
                            if (last && g.relu) v = v > T(0) ? v : V{};
                            store(out + c, v, BLOCK);
                        }
                    }
                }
            }
        }
    }
}

}  // namespace

EXPORT_RUNS(strassen, StrassenArgs, strassen_panels)  // threads: runs of column panels
"""
)

_SHARED_WORK = 1 << 16  # multiply-adds below which one thread runs
_MIN_ROWS = 128  # fewer rows than this: the plain product (the sums are not repaid)
_MIN_INPUTS = 2048  # fewer input channels: the half-size products are too small to gain

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class _StrassenArgs(ctypes.Structure):
    _fields_ = [
        ("M", _i64), ("h", _i64), ("K2", _i64), ("N2", _i64),
        ("x", _ptr), ("xt", _i64),
        ("zero", _ptr),
        ("w", _ptr),
        ("bias", _ptr),
        ("y", _ptr), ("yt", _i64),
        ("relu", _i64),
    ]  # fmt: skip


_LIBRARY = NativeLibrary("strassen", _SOURCE, {"strassen": _StrassenArgs})

available = _LIBRARY.available  # whether the kernel builds and loads (built on first call)
build_error = _LIBRARY.build_error  # why it does not, if it does not


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a 1x1 layer with weights ``weight`` ``[N, K, 1]`` should take :func:`strassen`
    for input ``x`` ``[B, T, K]``: what :func:`conv_kernel.supports` asks, ``K`` even and at
    least 2048, ``N / 2`` a multiple of 64, ``x`` contiguous with at least 128 rows."""
    n, k, taps = weight.shape
    return (
        taps == 1
        and k % 2 == 0
        and k >= _MIN_INPUTS
        and n % (2 * conv_kernel.PANEL) == 0
        and x.is_contiguous()
        and x.shape[0] * x.shape[1] >= _MIN_ROWS
        and conv_kernel.supports(x, weight)
        and _LIBRARY.takes(x)
    )


def pack_products(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The seven weight combinations of ``weight`` ``[N, K, 1]``, each packed as
    :func:`conv_kernel.pack_weight` packs a ``[N/2, K/2, 1]`` layer, interleaved panel by
    panel: ``[N/128]`` x ``[7]`` x ``[K/2, 64]``, flat."""
    wt = weight.detach()[:, :, 0].to(dtype).T  # [K, N]: y = x wt
    k2, n2 = wt.shape[0] // 2, wt.shape[1] // 2
    b11, b12, b21, b22 = wt[:k2, :n2], wt[:k2, n2:], wt[k2:, :n2], wt[k2:, n2:]
    combos = [b11 + b22, b11, b12 - b22, b21 - b11, b22, b11 + b12, b21 + b22]
    packed = torch.stack([conv_kernel.pack_weight(c.T.contiguous()[:, :, None]) for c in combos])
    # [panel][product][K/2][64]: the seven panels a thread reads in turn lie together
    panels = n2 // conv_kernel.PANEL
    return packed.reshape(7, panels, -1).transpose(0, 1).contiguous().reshape(-1)


def strassen(
    x: torch.Tensor, packed: torch.Tensor, out_channels: int, bias: torch.Tensor, relu: bool
) -> torch.Tensor:
    """``act(x W^T + bias)`` for ``x`` ``[B, T, K]`` (contiguous) from :func:`pack_products`'
    ``packed`` -> ``[B, T, N]``."""
    b, t, k = x.shape
    dtype = x.dtype
    m, n = b * t, out_channels
    k2, n2 = k // 2, n // 2
    if not x.is_contiguous() or k % 2 or n % (2 * conv_kernel.PANEL) or m < 2:
        raise ValueError(f"x {tuple(x.shape)} -> {n} channels: not supported")
    if packed.dtype != dtype or packed.shape != (7 * k2 * n2,):
        raise ValueError(f"packed weights are not 7 x {k2} x {n2} {dtype}")
    bias = bias.to(dtype).contiguous()
    if bias.shape != (n,):
        raise ValueError(f"bias must be [{n}]")
    h = (m + 1) // 2  # rows of the top half; the bottom half has m - h
    zero = x.new_zeros(k2)
    y = x.new_empty(b, t, n)
    args = _StrassenArgs(
        m, h, k2, n2,
        x.data_ptr(), k,
        zero.data_ptr(),
        packed.data_ptr(),
        bias.data_ptr(),
        y.data_ptr(), n,
        int(relu),
    )  # fmt: skip
    panels = -(-n2 // conv_kernel.PANEL)
    _LIBRARY.run("strassen", dtype, args, panels, 7 * h * k2 * n2, _SHARED_WORK)
    return y
