"""Compiled CPU kernel for the Res2Net part of an SE-Res2Block (Gao et al. 2019, "Res2Net: A
New Multi-scale Backbone Architecture"; ECAPA-TDNN's SE-Res2Blocks, Desplanques et al.
2020), for :class:`~attn_speech.ecapa.fast._FastBlock`: all groups in one call.

In :mod:`attn_speech.ecapa.fast` the first TDNN's output ``u`` ``[B, T, C]`` (time-major,
its BatchNorm ``a * u + b`` pending) is split into ``scale`` groups of ``W = C / scale``
columns. Group ``i >= 1`` convolves its input ``x_i`` (``k`` taps, dilation ``d``, reflection
padded by ``p = d (k - 1) / 2`` frames the way SpeechBrain pads, each item at its own last
valid frame) into ``r_i = relu(conv_i(x_i) + bias_i)``; its output ``y_i = g_i r_i + h_i``
(its BatchNorm) replaces the group's own columns of ``u``, and the next group reads
``x_{i+1} = y_i + a_{i+1} u_{i+1}`` (the shift of ``a u + b`` is folded into the
convolutions' biases, the first group's scale into its weights, so ``x_1 = u_1``).

:func:`res2net` does all of it in one call, one parallel region:

* the convolutions are the register-blocked tiles of :mod:`attn_speech.ecapa.conv_kernel`
  (6 rows by 64 channels), on unpadded inputs: a tile reads each tap's rows through the
  reflection index, so no padded copy is ever made;
* a tile's epilogue applies the BatchNorm, writes ``y`` into ``u`` and the next group's input
  row into the other of two ``[B, T, W]`` buffers, while both are in registers and L1;
* the threads split each group's tiles as the convolution kernel does (one 64-channel panel
  each at ``W = 128``) and meet at a barrier between groups, the only point where a group's
  input is complete.

The PyTorch path it replaces took, per group, a oneDNN convolution and a pass of BatchNorm,
next input and reflected edges, each with its Python and dispatch costs.

The C++ source is compiled on first use by :class:`core_attention.native.NativeLibrary`;
:func:`available` is False where there is no compiler or the build fails, and callers then
use their PyTorch code. Inference only: no gradients. Float32 and float64.

Shapes: ``u`` ``[B, T, C]`` (unit stride along ``C``; may be a view), ``C = scale W``, ``W`` a
multiple of 16 and at most 1024; per group (``scale - 1`` of them) the weights ``[W, W, k]``
as :func:`pack_groups` packs them, ``bias``, ``scale``, ``shift`` ``[scale - 1, W]``; ``a``
``[C]``; ``frames`` ``[B]`` valid frames (``None``: all ``T``).
"""

from __future__ import annotations

import ctypes

import torch

from attn_speech.ecapa import conv_kernel
from core_attention.native import BLOCK, NativeLibrary, addr

__all__ = ["available", "build_error", "pack_groups", "res2net", "supports"]

_SOURCE = (
    conv_kernel.TILES
    + r"""
extern "C" {

// Groups g = 1 .. G of u [B, T, C] (columns g W .. (g + 1) W; rows unit stride), weights w
// [G][W W taps] (conv_kernel's panels), bias, scale, shift [G][W], a [C]; p: two [B, T, W]
// buffers, ps elements apart.
struct BlockArgs {
    int64_t B, T, W, G, taps, dil;
    void* u; int64_t us, ut;
    const void* w;
    const void* bias; const void* scale; const void* shift;
    const void* a;
    void* p; int64_t ps;
    const int64_t* frames;
};

}

namespace {

// SpeechBrain's "same" reflection of frame t of an item whose last valid frame is last,
// clamped into [0, T) (lengths shorter than the padding)
inline int64_t reflect(int64_t t, int64_t last, int64_t T) {
    t = t < 0 ? -t : t;
    t = t > last ? 2 * last - t : t;
    return t < 0 ? 0 : (t > T - 1 ? T - 1 : t);
}

template <typename T, typename V>
void block(const BlockArgs& g, int64_t k, int64_t n) {
    const int64_t W = g.W, tiles = (g.T + ROWS - 1) / ROWS, per_panel = g.B * tiles;
    const int64_t items = (W + PANEL - 1) / PANEL * per_panel;
    const int64_t i0 = items * k / n, i1 = items * (k + 1) / n;
    const int64_t half = (g.taps - 1) / 2, wsize = W * W * g.taps;
    T* u = (T*)g.u;
    T* p = (T*)g.p;
    const T* a = (const T*)g.a;
    // the first group's input: u's columns W .. 2W, which its output will overwrite
    const int64_t rows_all = g.B * g.T;
    for (int64_t row = rows_all * k / n; row < rows_all * (k + 1) / n; ++row)
        std::memcpy(p + g.ps + row * W, u + row / g.T * g.us + row % g.T * g.ut + W,
                    W * sizeof(T));
#pragma omp barrier
    const T* rows[ROWS * MAX_TAPS];
    alignas(64) T r_tile[ROWS * PANEL];
    for (int64_t gi = 0; gi < g.G; ++gi) {
        const T* in = p + ((gi + 1) & 1) * g.ps;
        T* next = gi + 1 < g.G ? p + (gi & 1) * g.ps : nullptr;
        const int64_t col = (gi + 1) * W;
        const T* wg = (const T*)g.w + gi * wsize;
        const T* bias = (const T*)g.bias + gi * W;
        const T* sc = (const T*)g.scale + gi * W;
        const T* sh = (const T*)g.shift + gi * W;
        for (int64_t item = i0; item < i1; ++item) {
            const int64_t n0 = item / per_panel * PANEL;
            const int64_t width = W - n0 < PANEL ? W - n0 : PANEL;
            const int64_t b = item % per_panel / tiles, kt = item % tiles;
            const int64_t t0 = kt * g.T / tiles, r = (kt + 1) * g.T / tiles - t0;
            int64_t last = g.frames ? g.frames[b] - 1 : g.T - 1;
            last = last < 0 ? 0 : last;
            const T* in_b = in + b * g.T * W;
            for (int64_t j = 0; j < g.taps; ++j)
                for (int64_t q = 0; q < r; ++q)
                    rows[j * r + q] = in_b + reflect(t0 + q + (j - half) * g.dil, last, g.T) * W;
            // u's rows are C apart (4 KiB at C = 1024), beyond the hardware prefetchers'
            // reach: fetch what the epilogue writes and reads while the tile computes
            for (int64_t q = 0; q < r; ++q) {
                const T* uq = u + b * g.us + (t0 + q) * g.ut + col + n0;
                for (int64_t c = 0; c < width; c += 64 / sizeof(T)) {
                    __builtin_prefetch(uq + c, 1);
                    if (next) __builtin_prefetch(uq + W + c, 0);
                }
            }
            tile_of<T, V>(r, width / BLOCK)(rows, g.taps, W, wg + n0 * g.taps * W, W * width,
                                            bias + n0, 0, r_tile, width, true);
            for (int64_t q = 0; q < r; ++q) {
                T* uq = u + b * g.us + (t0 + q) * g.ut;
                T* nq = next ? next + (b * g.T + t0 + q) * W : nullptr;
                for (int64_t c = n0; c < n0 + width; c += BLOCK) {
                    const V rv = load<V>(r_tile + q * width + c - n0, BLOCK);
                    const V y = load<V>(sc + c, BLOCK) * rv + load<V>(sh + c, BLOCK);
                    store(uq + col + c, y, BLOCK);
                    if (!nq) continue;
                    const V x = load<V>(uq + col + W + c, BLOCK);
                    store(nq + c, y + load<V>(a + col + W + c, BLOCK) * x, BLOCK);
                }
            }
        }
        if (next) {
#pragma omp barrier
        }
    }
}

template <typename T, typename V>
void run_block(const BlockArgs* a, int64_t items, int64_t threads) {
    if (threads <= 1) {
        block<T, V>(*a, 0, 1);
        return;
    }
#pragma omp parallel num_threads(threads)
    block<T, V>(*a, omp_get_thread_num(), omp_get_num_threads());
}

}  // namespace

EXPORT_DISPATCH(res2net, BlockArgs, run_block)
"""
)

_SHARED_WORK = 1 << 16  # multiply-adds below which one thread runs

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class _BlockArgs(ctypes.Structure):
    _fields_ = [
        ("B", _i64), ("T", _i64), ("W", _i64), ("G", _i64), ("taps", _i64), ("dil", _i64),
        ("u", _ptr), ("us", _i64), ("ut", _i64),
        ("w", _ptr),
        ("bias", _ptr), ("scale", _ptr), ("shift", _ptr),
        ("a", _ptr),
        ("p", _ptr), ("ps", _i64),
        ("frames", _ptr),
    ]  # fmt: skip


_LIBRARY = NativeLibrary("res2net", _SOURCE, {"res2net": _BlockArgs})
_DTYPES = (torch.float32, torch.float64)

available = _LIBRARY.available  # whether the kernel builds and loads (built on first call)
build_error = _LIBRARY.build_error  # why it does not, if it does not


def supports(u: torch.Tensor, width: int, taps: int) -> bool:
    """Whether blocks should take :func:`res2net` for ``u`` with groups of ``width``
    channels and ``taps`` taps: a CPU with AVX-512 (:data:`conv_kernel.WIDE_REGISTERS`),
    float32/float64, ``width`` a multiple of 16 up to 1024, at most
    :data:`conv_kernel.MAX_TAPS` taps, no tracer, the library available."""
    return (
        conv_kernel.WIDE_REGISTERS
        and width % BLOCK == 0
        and width <= conv_kernel.PASS_CHANNELS
        and taps <= conv_kernel.MAX_TAPS
        and _LIBRARY.takes(u)
    )


def pack_groups(weights: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The groups' ``[W, W, k]`` weights packed for :func:`res2net`, ``[G, W W k]``."""
    return torch.stack([conv_kernel.pack_weight(w, dtype) for w in weights])


def _rows(v: torch.Tensor, dtype: torch.dtype, shape: tuple, name: str) -> torch.Tensor:
    if v.dtype != dtype or v.shape != shape or not v.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape {list(shape)}")
    return v


def res2net(
    u: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    a: torch.Tensor,
    taps: int,
    dilation: int,
    frames: torch.Tensor | None = None,
) -> torch.Tensor:
    """Groups ``1 .. G`` of ``u`` in place (see the module docstring); returns ``u``."""
    dtype = u.dtype
    if dtype not in _DTYPES or not u.is_cpu or u.dim() != 3 or u.stride(2) != 1:
        raise ValueError("u must be [B, T, C] float32/float64 on the CPU with unit stride along C")
    batch, t, c = u.shape
    groups, size = packed.shape
    width = c // (groups + 1)
    if t < 1 or width * (groups + 1) != c or size != width * width * taps:
        raise ValueError(f"packed weights {tuple(packed.shape)} do not split u {tuple(u.shape)}")
    if width % BLOCK or width > conv_kernel.PASS_CHANNELS or not 1 <= taps <= conv_kernel.MAX_TAPS:
        raise ValueError(f"groups of {width} channels with {taps} taps: not supported")
    _rows(packed, dtype, (groups, size), "packed")
    for name, v in (("bias", bias), ("scale", scale), ("shift", shift)):
        _rows(v, dtype, (groups, width), name)
    _rows(a, dtype, (c,), "a")
    if frames is not None:
        frames = frames.to(torch.int64).contiguous()
        if frames.shape != (batch,):
            raise ValueError(f"frames must be [{batch}]")
    buffers = u.new_empty(2, batch * t * width)
    us, ut, _ = u.stride()
    args = _BlockArgs(
        batch, t, width, groups, taps, dilation,
        u.data_ptr(), us, ut,
        packed.data_ptr(),
        bias.data_ptr(), scale.data_ptr(), shift.data_ptr(),
        a.data_ptr(),
        buffers.data_ptr(), buffers.stride(0),
        addr(frames),
    )  # fmt: skip
    items = -(-width // conv_kernel.PANEL) * batch * -(-t // conv_kernel.ROWS)
    work = groups * batch * t * width * width * taps
    _LIBRARY.run("res2net", dtype, args, items, work, _SHARED_WORK)
    return u
