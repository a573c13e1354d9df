"""Compiled CPU kernel for the element-wise glue between the Res2Net groups of an SE-Res2Block
(Gao et al. 2019, "Res2Net: A New Multi-scale Backbone Architecture"; ECAPA-TDNN's
SE-Res2Blocks, Desplanques et al. 2020), for :class:`~attn_speech.ecapa.fast._FastBlock`.

In :mod:`attn_speech.ecapa.fast` the first TDNN's output ``u`` ``[B, T, C]`` (time-major,
its BatchNorm ``a * u + b`` pending) is split into ``scale`` groups of ``W = C / scale``
columns. Group ``i >= 1`` convolves (dilated, ReLU fused) its input ``x_i``, reflection
padded by ``p`` frames, into ``r_i`` ``[B, T, W]``; its output ``y_i = g_i r_i + h_i`` (its
BatchNorm) replaces the group's own columns of ``u``, and the next group reads
``x_{i+1} = y_i + a_{i+1} u_{i+1}`` (the shift of ``a u + b`` is folded into the
convolution). Between two convolutions PyTorch needs three passes and the edges (the
BatchNorm, the next input, its reflected edges; a gather instead when a padded batch reflects
each item at its own last frame); :meth:`Res2NetGlue.step` makes them one:

* ``u[..., col : col + W] = y = scale * r + shift`` (the group's output);
* ``buf[:, q] = y[:, s(q)] + a[nxt] * u[:, s(q), nxt]`` for every row ``q`` of the next
  group's padded input ``buf`` ``[B, T + 2p, W]``, ``nxt`` the next ``W`` columns and ``s``
  SpeechBrain's "same" reflection (:func:`attn_speech.ecapa.layers.reflect_index`: each item
  reflected at its own last valid frame when ``frames`` is given, the index clamped into
  ``[0, T)``), so ``buf`` holds what :func:`attn_speech.ecapa.time_conv.pad_time` and
  :func:`~attn_speech.ecapa.time_conv.reflect_edges` make of the next input, every row.

:meth:`Res2NetGlue.pad_input` is the first group's: ``buf[:, q] = u[:, s(q), col : col + W]``.

A work item is a chunk of 16 rows of ``buf`` of one batch item, vectorised over the ``W``
columns in blocks of 16 (unit stride along ``W``); the row ``q = p + t`` of the interior also
writes ``y`` at ``t``, so every output row is written by exactly one item. Rows read from a
reflected frame recompute ``y`` there from ``r`` (which is never written), so no item reads
what another writes. ``u``'s rows are ``C`` apart (4 KiB at ``C = 1024``), beyond the
hardware prefetchers' reach, so the kernel prefetches the rows four ahead.

Thread ``k`` of ``n`` takes the ``k``-th of ``n`` equal runs of items, rows in order: the
split oneDNN's convolutions and PyTorch's element-wise operations make of ``[B, T, W]`` rows,
so each core reads the rows of ``r`` its convolution thread just wrote and writes the rows of
``buf`` and ``u`` it will read next, in its own cache (on one thread, the next convolution
fetched half its input from the other core's cache and lost what the pass saved). The pass
itself (over ``r``, ``buf`` and two ``W``-column strips of
``u``) takes about 10 us at ``T = 500``, ``W = 128``; its Python side is kept to a few
microseconds a group (:class:`Res2NetGlue` checks the tensors once per call of the block).

The C++ source is compiled on first use by :class:`core_attention.native.NativeLibrary`;
:func:`available` is False where there is no compiler or the build fails, and callers then
use their PyTorch code. Inference only: no gradients.

Shapes: ``u`` ``[B, T, C]`` (unit stride along ``C``; may be a view); ``r`` ``[B, T, W]``;
``scale``, ``shift`` ``[W]``; ``a`` ``[C]``; ``buf`` ``[B, T + 2p, W]`` (unit stride along
``W``); ``frames`` ``[B]`` valid frames (``None``: all ``T``).
"""

from __future__ import annotations

import ctypes

import torch

from core_attention.native import NativeLibrary, addr

__all__ = ["Res2NetGlue", "available", "build_error", "supports"]

_SOURCE = r"""
#include <omp.h>

#include <type_traits>

extern "C" {

// For every row q < T + 2 pad of buf (items: chunks of ROWS rows of a batch item), s the
// reflection of frame q - pad: buf[q] = y(s) + a x[s] (x[s] when r is null; no buf when x is
// null), y(t) = scale r[t] + shift; out[t] = y(t) for interior rows q = pad + t (when r is
// given). All [.., W] rows have unit stride along W.
struct StepArgs {
    int64_t T, W, pad;
    const void* r; int64_t rs, rt;
    const void* scale; const void* shift;
    void* out; int64_t os, ot;
    const void* x; int64_t xs, xt;
    const void* a;
    void* buf; int64_t bs, bt;
    const int64_t* frames;
};

}

namespace {

// Rows ahead of the current one whose columns of u are prefetched: u's rows are C apart (4 KiB
// and more), so the hardware prefetchers, which stay within a page, fetch none of them.
constexpr int64_t AHEAD = 4;
constexpr int64_t ROWS = 16;
// f(c, w) on the blocks of 16 columns of a W-column row, w = 16 a compile-time constant on
// all but the last, partial, block.
template <typename F>
inline void blocks(int64_t W, F f) {
    int64_t c = 0;
    for (; c + BLOCK <= W; c += BLOCK) f(c, std::integral_constant<int64_t, BLOCK>{});
    if (c < W) f(c, W - c);
}

template <typename T>
inline void prefetch_row(const T* p, int64_t W, int write) {
    for (int64_t c = 0; c < W; c += 64 / sizeof(T)) __builtin_prefetch(p + c, write);
}

template <typename T, typename V>
void step_items(const StepArgs& g, int64_t item0, int64_t item1) {
    const int64_t n = g.T, W = g.W, pad = g.pad, rows = n + 2 * pad;
    const int64_t chunks = (rows + ROWS - 1) / ROWS;
    const int64_t rt = g.rt, ot = g.ot, xt = g.xt, bt = g.bt;
    const T* sc = (const T*)g.scale;
    const T* sh = (const T*)g.shift;
    const T* av = (const T*)g.a;
    for (int64_t item = item0; item < item1; ++item) {
        const int64_t i = item / chunks, q0 = item % chunks * ROWS;
        const int64_t q1 = q0 + ROWS < rows ? q0 + ROWS : rows;
        int64_t last = g.frames ? g.frames[i] - 1 : n - 1;
        last = last < 0 ? 0 : last;
        const T* r = g.r ? (const T*)g.r + i * g.rs : nullptr;
        T* out = g.out ? (T*)g.out + i * g.os : nullptr;
        const T* x = g.x ? (const T*)g.x + i * g.xs : nullptr;
        T* buf = g.x ? (T*)g.buf + i * g.bs : nullptr;
        for (int64_t q = q0; q < q1; ++q) {
            const int64_t t = q - pad;
            const bool inside = t >= 0 && t < n;
            if (x == nullptr && !inside) continue;
            int64_t s = t < 0 ? -t : t;
            s = s > last ? 2 * last - s : s;
            s = s < 0 ? 0 : (s > n - 1 ? n - 1 : s);
            if (AHEAD > 0 && t + AHEAD >= 0 && t + AHEAD < n) {
                if (x) prefetch_row(x + (t + AHEAD) * xt, W, 0);
                if (r) prefetch_row(out + (t + AHEAD) * ot, W, 1);
            }
            T* bq = x ? buf + q * bt : nullptr;
            const T* xs = x ? x + s * xt : nullptr;
            if (r == nullptr) {  // the first group: its input is x itself
                blocks(W, [&](int64_t c, auto w) { store(bq + c, load<V>(xs + c, w), w); });
            } else if (inside && s == t && x) {  // the interior: y once, for both outputs
                const T* rq = r + t * rt;
                T* oq = out + t * ot;
                blocks(W, [&](int64_t c, auto w) {
                    const V y = load<V>(sc + c, w) * load<V>(rq + c, w) + load<V>(sh + c, w);
                    store(oq + c, y, w);
                    store(bq + c, y + load<V>(av + c, w) * load<V>(xs + c, w), w);
                });
            } else {
                if (inside) {
                    const T* rq = r + t * rt;
                    T* oq = out + t * ot;
                    blocks(W, [&](int64_t c, auto w) {
                        const V y = load<V>(sc + c, w) * load<V>(rq + c, w) + load<V>(sh + c, w);
                        store(oq + c, y, w);
                    });
                }
                if (x) {  // a reflected row: y recomputed at frame s
                    const T* rs = r + s * rt;
                    blocks(W, [&](int64_t c, auto w) {
                        const V y = load<V>(sc + c, w) * load<V>(rs + c, w) + load<V>(sh + c, w);
                        store(bq + c, y + load<V>(av + c, w) * load<V>(xs + c, w), w);
                    });
                }
            }
        }
    }
}

// Thread k of n takes the k-th of n equal runs of items (rows in order): the split PyTorch's
// element-wise operations and oneDNN's convolutions make of [B, T, W] rows, so each thread
// writes the rows its core's cache will be asked for next, and reads those it wrote before.
template <typename T, typename V>
void split_items(const StepArgs* a, int64_t items, int64_t threads) {
    if (threads <= 1) {
        step_items<T, V>(*a, 0, items);
        return;
    }
#pragma omp parallel num_threads(threads)
    {
        const int64_t k = omp_get_thread_num(), n = omp_get_num_threads();
        step_items<T, V>(*a, items * k / n, items * (k + 1) / n);
    }
}

}  // namespace

EXPORT_DISPATCH(step, StepArgs, split_items)
"""

_ROWS = 16  # rows of buf per work item (ROWS in the source)
# elements below which one thread runs: above, the threads share the rows the way PyTorch's
# element-wise operations and oneDNN's convolutions do (see the module docstring)
_SHARED_WORK = 1 << 12

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class _StepArgs(ctypes.Structure):
    _fields_ = [
        ("T", _i64), ("W", _i64), ("pad", _i64),
        ("r", _ptr), ("rs", _i64), ("rt", _i64),
        ("scale", _ptr), ("shift", _ptr),
        ("out", _ptr), ("os", _i64), ("ot", _i64),
        ("x", _ptr), ("xs", _i64), ("xt", _i64),
        ("a", _ptr),
        ("buf", _ptr), ("bs", _i64), ("bt", _i64),
        ("frames", _ptr),
    ]  # fmt: skip


_LIBRARY = NativeLibrary("res2net_glue", _SOURCE, {"step": _StepArgs})
_DTYPES = (torch.float32, torch.float64)


available = _LIBRARY.available  # whether the kernel builds and loads (built on first call)
build_error = _LIBRARY.build_error  # why it does not, if it does not
supports = _LIBRARY.takes  # whether it takes these tensors (CPU float32/float64, no tracer)


def _vector(v: torch.Tensor, dtype: torch.dtype, size: int, name: str) -> torch.Tensor:
    if v.dtype != dtype or v.dim() != 1 or v.shape[0] != size or v.stride(0) != 1:
        raise ValueError(f"{name} must be a contiguous {dtype} vector of {size} entries")
    return v


class Res2NetGlue:
    """The glue of one Res2Net call: ``u`` ``[B, T, C]`` (unit stride along ``C``), the padded
    input buffer ``buf`` ``[B, T + 2p, W]`` (unit stride along ``W``), ``a`` ``[C]`` (the
    factor of ``u`` in the groups' inputs) and ``frames`` ``[B]`` (``None``: all ``T``),
    checked once; each call then sets the few arguments that change (a few microseconds of
    Python a group: the kernel itself takes about ten at ``T = 500``, ``W = 128``).
    """

    def __init__(
        self,
        u: torch.Tensor,
        buf: torch.Tensor,
        a: torch.Tensor,
        frames: torch.Tensor | None = None,
    ) -> None:
        dtype = u.dtype
        if dtype not in _DTYPES or not u.is_cpu:
            raise ValueError(f"u must be float32 or float64 on the CPU, got {dtype} {u.device}")
        batch, t, c = u.shape
        width = buf.shape[-1]
        pad, odd = divmod(buf.shape[1] - t, 2)
        if t < 1 or u.stride(2) != 1:
            raise ValueError(f"u {tuple(u.shape)} needs frames and unit stride along C")
        if buf.shape != (batch, t + 2 * pad, width) or odd or buf.dtype != dtype:
            raise ValueError(f"buf {tuple(buf.shape)} is not [{batch}, {t} + 2 pad, W] {dtype}")
        if buf.stride(2) != 1 or not buf.is_cpu or width < 1:
            raise ValueError("buf needs unit stride along its columns")
        self.a = _vector(a, dtype, c, "a")
        if frames is not None:
            frames = frames.to(torch.int64).contiguous()
            if frames.shape != (batch,):
                raise ValueError(f"frames must be [{batch}]")
        self.u, self.buf, self.frames = u, buf, frames  # alive while the kernel reads them
        self.dtype, self.shape, self.columns = dtype, (batch, t, width), c
        self._size = u.element_size()
        self._base = u.data_ptr()
        self._a = self.a.data_ptr()
        us, ut, _ = u.stride()
        bs, bt, _ = buf.stride()
        self._args = _StepArgs(
            t, width, pad, None, 0, 0, None, None, None, us, ut, None, us, ut, None,
            buf.data_ptr(), bs, bt, addr(frames),
        )  # fmt: skip
        rows = t + 2 * pad
        self._items, self._work = batch * -(-rows // _ROWS), batch * rows * width
        if not available():
            raise RuntimeError(f"the Res2Net kernel is not available: {build_error()}")

    def _columns(self, col: int, count: int) -> None:
        if col < 0 or col + count * self.shape[2] > self.columns:
            raise ValueError(f"columns {col} + {count} x {self.shape[2]} of u's {self.columns}")

    def _call(self) -> None:
        _LIBRARY.run("step", self.dtype, self._args, self._items, self._work, _SHARED_WORK)

    def pad_input(self, col: int) -> None:
        """``buf`` = ``u[..., col : col + W]`` reflection padded (each item at its own last
        valid frame), as :func:`attn_speech.ecapa.time_conv.pad_time`."""
        self._columns(col, 1)
        args = self._args
        args.r = args.out = args.a = None
        args.x = self._base + col * self._size
        self._call()

    def step(
        self,
        col: int,
        r: torch.Tensor,
        scale: torch.Tensor,
        shift: torch.Tensor,
        next_input: bool = True,
    ) -> None:
        """``y = scale * r + shift`` written over ``u[..., col : col + W]`` and, with
        ``next_input``, ``buf`` = ``y + a[nxt] * u[..., nxt]`` reflection padded, ``nxt``
        the next ``W`` columns ``col + W : col + 2 W``. ``r`` ``[B, T, W]``; ``scale``,
        ``shift`` ``[W]``."""
        self._columns(col, 2 if next_input else 1)
        dtype, width = self.dtype, self.shape[2]
        if r.shape != self.shape or r.dtype != dtype or r.stride(2) != 1 or not r.is_cpu:
            raise ValueError(f"r must be {dtype} {self.shape} with unit stride along W")
        args = self._args
        args.r = r.data_ptr()
        args.rs, args.rt, _ = r.stride()
        args.scale = _vector(scale, dtype, width, "scale").data_ptr()
        args.shift = _vector(shift, dtype, width, "shift").data_ptr()
        args.out = self._base + col * self._size
        if next_input:
            nxt = (col + width) * self._size
            args.x, args.a = self._base + nxt, self._a + nxt
        else:
            args.x = args.a = None
        self._call()
