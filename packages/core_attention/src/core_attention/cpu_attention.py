"""Scaled-dot-product attention for small heads on CPU, inference only: a compiled kernel.

PyTorch's CPU attention kernels block the score matrix into GEMMs, which pay off for head
sizes of 64 and more; with heads of 8 or 16 channels (MambAttention's 64 channels in 8
heads, Kühne et al. 2025) each score costs more in call and packing overhead than in
arithmetic, and the ``exp`` of the softmax dominates. This kernel walks one query row at a
time against keys held transposed in 16-key vectors (one AVX-512 register of float32): the
row's scores ``q k^T * scale`` go to an L1-resident buffer with their running maximum, then
one pass computes ``exp(s - max)`` (as ``2^(s log2 e - max)``, a polynomial of
:data:`core_attention.native.PRELUDE`, the ``log2 e`` folded into the query scale),
its sum and ``sum_j p_j v_j``. Work items are ``(batch, head, block of query rows)``, shared
by PyTorch's OpenMP threads; each item transposes its keys and values once.

Shapes: ``q`` ``[B, H, Nq, D]``, ``k`` ``[B, H_kv, Nk, D]``, ``v`` ``[B, H_kv, Nk, Dv]``
(``H % H_kv == 0``), any strides with unit stride along the head channels; ``key_lengths``
``[B]``. The output ``[B, H, Nq, Dv]`` is a view of a ``[B, Nq, H, Dv]`` buffer, so the usual
``out.transpose(1, 2).reshape(B, Nq, H * Dv)`` that follows is free.

Float32 and float64 (the library ``exp``, for tests); no mask other than key lengths, no
causal mask, no dropout, no gradients. :func:`unsupported_reason` says when it cannot run.
"""

from __future__ import annotations

import ctypes

import torch

from core_attention.native import NativeLibrary, addr, tracing

__all__ = ["MAX_HEAD_DIM", "available", "build_error", "small_head_attention", "unsupported_reason"]

MAX_HEAD_DIM = 16  # from 32 on, PyTorch's blocked kernels are as fast or faster
_ROWS_PER_ITEM = 64

_SOURCE = r"""
#include <limits>
#include <vector>

extern "C" {
struct AttnArgs {
    int64_t B, H, Hkv, Lq, Lk, D, Dv, rows;
    const void* q; int64_t qb, qh, qt;
    const void* k; int64_t kb, kh, kt;
    const void* v; int64_t vb, vh, vt;
    const int64_t* lengths;
    void* out; int64_t ob, oh, ot;
    double scale;
};
}

namespace {

constexpr int MAX_D = 16;

// FIXED > 0: D == Dv == FIXED at compile time, so the per-row accumulators stay in registers.
template <typename T, typename V, int FIXED>
void attn_items(const AttnArgs& a, int64_t item0, int64_t item1) {
    const int64_t D = FIXED ? FIXED : a.D, Dv = FIXED ? FIXED : a.Dv;
    const int64_t row_blocks = (a.Lq + a.rows - 1) / a.rows;
    const int64_t kblocks = (a.Lk + BLOCK - 1) / BLOCK;
    const T* qp = (const T*)a.q;
    const T* kp = (const T*)a.k;
    const T* vp = (const T*)a.v;
    T* op = (T*)a.out;
    std::vector<V> kt(kblocks * D), vt(kblocks * Dv), sc(kblocks);
    const T neg_inf = -std::numeric_limits<T>::infinity();
    // scores in base-2 units: softmax(s) = 2^(s log2 e - max) / sum
    const T q_scale = (T)(a.scale * 1.4426950408889634);
    int64_t loaded = -1;  // b * Hkv + kv head whose keys and values are in kt, vt
    for (int64_t item = item0; item < item1; ++item) {
        const int64_t bh = item / row_blocks, r0 = (item % row_blocks) * a.rows;
        const int64_t r1 = r0 + a.rows < a.Lq ? r0 + a.rows : a.Lq;
        const int64_t b = bh / a.H, h = bh % a.H, hk = h / (a.H / a.Hkv);
        int64_t len = a.lengths ? a.lengths[b] : a.Lk;
        len = len < a.Lk ? len : a.Lk;
        if (len <= 0) {
            for (int64_t i = r0; i < r1; ++i)
                for (int64_t c = 0; c < Dv; ++c) op[b * a.ob + h * a.oh + i * a.ot + c] = 0;
            continue;
        }
        const int64_t nkb = (len + BLOCK - 1) / BLOCK, tail = len - (nkb - 1) * BLOCK;
        if (loaded != b * a.Hkv + hk) {
            // [key block][channel] of 16-key vectors; lanes past len stay zero
            for (int64_t jb = 0; jb < nkb; ++jb) {
                const int64_t w = jb == nkb - 1 ? tail : BLOCK;
                for (int64_t c = 0; c < D; ++c) kt[jb * D + c] = V{};
                for (int64_t c = 0; c < Dv; ++c) vt[jb * Dv + c] = V{};
                for (int64_t l = 0; l < w; ++l) {
                    const T* kr = kp + b * a.kb + hk * a.kh + (jb * BLOCK + l) * a.kt;
                    const T* vr = vp + b * a.vb + hk * a.vh + (jb * BLOCK + l) * a.vt;
                    for (int64_t c = 0; c < D; ++c) kt[jb * D + c][l] = kr[c];
                    for (int64_t c = 0; c < Dv; ++c) vt[jb * Dv + c][l] = vr[c];
                }
            }
            loaded = b * a.Hkv + hk;
        }
        for (int64_t i = r0; i < r1; ++i) {
            const T* qr = qp + b * a.qb + h * a.qh + i * a.qt;
            T qs[MAX_D];
            for (int64_t c = 0; c < D; ++c) qs[c] = qr[c] * q_scale;
            V mx = V{} + neg_inf;
            for (int64_t jb = 0; jb < nkb; ++jb) {
                V s = V{};
                for (int64_t c = 0; c < D; ++c) s += kt[jb * D + c] * qs[c];
                if (jb == nkb - 1)
                    for (int64_t l = tail; l < BLOCK; ++l) s[l] = neg_inf;
                sc[jb] = s;
                mx = mx > s ? mx : s;
            }
            const T m = hmax(mx);
            V sum = V{};
            V acc[MAX_D];
            for (int64_t c = 0; c < Dv; ++c) acc[c] = V{};
            for (int64_t jb = 0; jb < nkb; ++jb) {
                V p = vexp2(sc[jb] - m);
                if (jb == nkb - 1) p = sc[jb] == neg_inf ? V{} : p;
                sum += p;
                for (int64_t c = 0; c < Dv; ++c) acc[c] += p * vt[jb * Dv + c];
            }
            const T inv = (T)1 / hsum(sum);
            T* orow = op + b * a.ob + h * a.oh + i * a.ot;
            for (int64_t c = 0; c < Dv; ++c) orow[c] = hsum(acc[c]) * inv;
        }
    }
}

template <typename T, typename V>
void attn_dispatch(const AttnArgs* a, int64_t items, int64_t threads) {
    if (a->D == 8 && a->Dv == 8) {
        parallel(a, items, threads, attn_items<T, V, 8>);
    } else if (a->D == 16 && a->Dv == 16) {
        parallel(a, items, threads, attn_items<T, V, 16>);
    } else {
        parallel(a, items, threads, attn_items<T, V, 0>);
    }
}

}  // namespace

EXPORT_DISPATCH(attention, AttnArgs, attn_dispatch)
"""

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class _AttnArgs(ctypes.Structure):
    _fields_ = [
        *[(k, _i64) for k in ("B", "H", "Hkv", "Lq", "Lk", "D", "Dv", "rows")],
        ("q", _ptr), ("qb", _i64), ("qh", _i64), ("qt", _i64),
        ("k", _ptr), ("kb", _i64), ("kh", _i64), ("kt", _i64),
        ("v", _ptr), ("vb", _i64), ("vh", _i64), ("vt", _i64),
        ("lengths", _ptr),
        ("out", _ptr), ("ob", _i64), ("oh", _i64), ("ot", _i64),
        ("scale", ctypes.c_double),
    ]  # fmt: skip


_LIBRARY = NativeLibrary("small_head_attention", _SOURCE, {"attention": _AttnArgs})


def available() -> bool:
    """Whether the kernel is compiled and loaded (compiles it on the first call)."""
    return _LIBRARY.available()


def build_error() -> str | None:
    """Why :func:`available` is False, if it is."""
    return _LIBRARY.build_error()


def unsupported_reason(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
) -> str | None:
    """``None`` when :func:`small_head_attention` can compute this call, else why not."""
    if q.device.type != "cpu":
        return f"inputs are on {q.device.type}, not the CPU"
    if q.dtype not in (torch.float32, torch.float64):
        return f"dtype {q.dtype} (float32 or float64 only)"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return "gradients are needed (the kernel is inference-only)"
    if attn_mask is not None or causal:
        return "masks other than key lengths"
    if dropout_p > 0:
        return "dropout"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"head size above {MAX_HEAD_DIM}"
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        return "head channels not contiguous"
    if tracing(q, k, v):
        return "a tracer is recording (torch.compile, torch.export or TorchScript)"
    if not available():
        return f"the kernel did not build: {build_error()}"
    return None


def small_head_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    key_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` with keys at or past ``key_lengths[b]`` ignored (rows of
    an item without keys are zero). Shapes as in the module docstring."""
    reason = unsupported_reason(q, k, v)
    if reason is not None:
        raise RuntimeError(f"small_head_attention cannot run: {reason}")
    b, h, nq, _ = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
    out = torch.empty(b, nq, h, dv, dtype=q.dtype).transpose(1, 2)
    lengths = None
    if key_lengths is not None:
        lengths = key_lengths.to(device="cpu", dtype=torch.int64).contiguous()
    rows = _ROWS_PER_ITEM
    args = _AttnArgs(
        b, h, hkv, nq, nk, q.shape[-1], dv, rows,
        addr(q), *q.stride()[:3],
        addr(k), *k.stride()[:3],
        addr(v), *v.stride()[:3],
        addr(lengths),
        addr(out), *out.stride()[:3],
        float(scale),
    )  # fmt: skip
    items = b * h * -(-nq // rows)
    _LIBRARY.run("attention", q.dtype, args, items, b * h * nq * nk * q.shape[-1])
    return out
