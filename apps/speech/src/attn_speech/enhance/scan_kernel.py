"""Compiled CPU kernels for the Mamba layers (Gu & Dao 2023, "Mamba: Linear-Time Sequence
Modeling with Selective State Spaces", Algorithm 2 / S6) of MambAttention (Kühne et al. 2025).

The step loop of :func:`~attn_speech.enhance.selective_scan.scan_fused` spends its time
streaming the ``[B, D, N]`` state through memory five times per step (exp, products, fused
multiply-add, matmul). :func:`scan_tokens` does one pass: for a block of 16 channels of one
sequence the state ``[N, 16]`` stays in registers and L1 for the whole sequence, and the step
size ``softplus(dt W^T + b)``, the skip term ``D u`` and the gate ``silu(z)`` are computed on
the way. :func:`conv_silu` is Mamba's depthwise causal convolution with its SiLU. Both read
the token-major output of Mamba's input projection as it is (no transposes or copies).

The C++ source below is compiled on first use by :class:`core_attention.native.NativeLibrary`
(the system's C++ compiler, the user's cache folder, :mod:`ctypes`); :func:`available` is
False where there is no compiler or the build fails, and callers then use the PyTorch loop.
Work is split between ``torch.get_num_threads()`` OpenMP threads of the runtime PyTorch
already runs. Float32 uses polynomial ``exp``/``log1p`` (about 1 ulp); float64 the C
library.

:func:`scan_tokens_grad` is the backward of the scan (step size given, forward direction),
for training; the convolution and the step-size projection have no backward here.

Shapes (token-major, unit stride along channels): ``u``, ``z``, ``y`` ``[S, L, D]``;
``B``, ``C`` ``[S, L, N]``; ``A`` ``[D, N]``; ``D`` ``[D]``.
"""

from __future__ import annotations

import ctypes

import torch

from core_attention.native import BLOCK, NativeLibrary, addr, unit_stride_last

__all__ = [
    "available",
    "build_error",
    "conv_silu",
    "scan_tokens",
    "scan_tokens_grad",
    "supports",
]

_MAX_STATE = 64

_SOURCE = r"""
#include <vector>

namespace {

constexpr int MAX_STATE = 64;
constexpr int MAX_RANK = 64;

template <typename V>
inline V silu(V x) { return x / (1 + vexp(-x)); }

// torch.nn.functional.softplus (threshold 20).
template <typename V>
inline V softplus(V x) { return x > 20 ? x : vlog1p(vexp(x)); }

}  // namespace

extern "C" {

// Selective scan over token-major tensors: u, z, y [S, L, D] (unit stride along D); B, C
// [S, L, N]; A [D, N]. delta is [S, L, D] as given when dt_w is null, else the low-rank
// input [S, L, R] of delta = softplus(dt_in dt_w^T + dt_b), dt_w [D, R].
struct ScanArgs {
    int64_t L, D, N, R;
    const void* u; int64_t us, ut;
    const void* delta; int64_t ds, dt, dr;
    const void* dt_w; const void* dt_b;
    const void* A;
    const void* B; int64_t bs, bt, bn;
    const void* C; int64_t cs, ct, cn;
    const void* Dv;
    const void* z; int64_t zs, zt;
    void* y;
    int64_t reverse;
};

// Depthwise causal convolution + SiLU (Mamba's conv1d): x [S, L, D] (unit stride along
// D), w [D, K], b [D] or null, out [S, L, D]; reverse: anti-causal, for the backward scan.
struct ConvArgs {
    int64_t L, D, K;
    const void* x; int64_t xs, xt;
    const void* w; const void* b;
    void* out;
    int64_t reverse;
};

// Gradients of the scan (contiguous token-major inputs; delta the positive step size):
// u, delta, z, gy [S, L, D]; B, C [S, L, N]; A [D, N]. Out: gu, gdelta, gz [S, L, D];
// per (sequence, channel block) partial sums gB, gC [S, blocks, L, N]; per sequence
// partial sums gA [S, D, N] and gD [S, D].
struct GradArgs {
    int64_t L, D, N;
    const void* u; const void* delta; const void* A; const void* B; const void* C;
    const void* Dv; const void* z; const void* gy;
    void* gu; void* gdelta; void* gA; void* gB; void* gC; void* gD; void* gz;
};

}

namespace {

// FIXED_N > 0: N known at compile time, so the state loop unrolls and h stays in registers.
template <typename T, typename V, int FIXED_N>
void scan_items(const ScanArgs& a, int64_t item0, int64_t item1) {
    const int64_t L = a.L, D = a.D, N = FIXED_N ? FIXED_N : a.N, R = a.R;
    const T* A = (const T*)a.A;
    const T* Bm = (const T*)a.B;
    const T* Cm = (const T*)a.C;
    const T* u = (const T*)a.u;
    const T* dl = (const T*)a.delta;
    const T* z = (const T*)a.z;
    const T* dtw = (const T*)a.dt_w;
    T* y = (T*)a.y;
    const int64_t blocks = (D + BLOCK - 1) / BLOCK;
    V h[MAX_STATE], decay[MAX_STATE], wt[MAX_RANK];
    for (int64_t item = item0; item < item1; ++item) {
        const int64_t s = item / blocks, d0 = (item % blocks) * BLOCK;
        const int64_t w = D - d0 < BLOCK ? D - d0 : BLOCK;
        for (int64_t n = 0; n < N; ++n) {
            h[n] = V{};
            for (int64_t k = 0; k < BLOCK; ++k)
                decay[n][k] = k < w ? A[(d0 + k) * N + n] * (T)1.4426950408889634 : 0;
        }
        if (dtw)
            for (int64_t r = 0; r < R; ++r)
                for (int64_t k = 0; k < BLOCK; ++k) wt[r][k] = k < w ? dtw[(d0 + k) * R + r] : 0;
        const V skip = a.Dv ? load<V>((const T*)a.Dv + d0, w) : V{};
        const V bias = a.dt_b ? load<V>((const T*)a.dt_b + d0, w) : V{};
        for (int64_t step = 0; step < L; ++step) {
            const int64_t t = a.reverse ? L - 1 - step : step;
            const V uu = load<V>(u + s * a.us + t * a.ut + d0, w);
            V dd;
            if (dtw) {
                const T* dp = dl + s * a.ds + t * a.dt;
                dd = bias;
                for (int64_t r = 0; r < R; ++r) dd += wt[r] * dp[r * a.dr];
                dd = softplus(dd);
            } else {
                dd = load<V>(dl + s * a.ds + t * a.dt + d0, w);
            }
            const V du = dd * uu;
            const T* bp = Bm + s * a.bs + t * a.bt;
            const T* cp = Cm + s * a.cs + t * a.ct;
            V acc = skip * uu, acc2 = V{};  // two sums: half the dependent-add chain
            for (int64_t n = 0; n < N; n += 2) {
                h[n] = vexp2(dd * decay[n]) * h[n] + du * bp[n * a.bn];  // exp(dd A)
                acc += h[n] * cp[n * a.cn];
                if (n + 1 < N) {
                    h[n + 1] = vexp2(dd * decay[n + 1]) * h[n + 1] + du * bp[(n + 1) * a.bn];
                    acc2 += h[n + 1] * cp[(n + 1) * a.cn];
                }
            }
            acc += acc2;
            if (z) acc *= silu(load<V>(z + s * a.zs + t * a.zt + d0, w));
            store(y + (s * L + t) * D + d0, acc, w);
        }
    }
}

// Reverse pass of the scan for one (sequence, 16-channel block): the forward states
// h_1..h_L are recomputed into a buffer, then with x_t = dL/dh_t (x_t = gs_t C_t +
// exp(delta_{t+1} A) x_{t+1}, gs_t the gradient of the ungated output):
//   gC_t = sum_d gs_t h_t,  gB_t = sum_d x_t delta_t u_t,
//   gdelta_t = sum_n x_t (A exp(delta_t A) h_{t-1} + B_t u_t),  gA = sum_t x_t delta_t
//   exp(delta_t A) h_{t-1},  gu_t = gs_t D + sum_n x_t delta_t B_t,  gD = sum_t gs_t u_t.
template <typename T, typename V, int FIXED_N>
void grad_items(const GradArgs& a, int64_t item0, int64_t item1) {
    const int64_t L = a.L, D = a.D, N = FIXED_N ? FIXED_N : a.N;
    const T* A = (const T*)a.A;
    const T* Bm = (const T*)a.B;
    const T* Cm = (const T*)a.C;
    const T* u = (const T*)a.u;
    const T* dl = (const T*)a.delta;
    const T* z = (const T*)a.z;
    const T* gy = (const T*)a.gy;
    T* gu = (T*)a.gu;
    T* gdl = (T*)a.gdelta;
    T* gz = (T*)a.gz;
    T* gA = (T*)a.gA;
    T* gB = (T*)a.gB;
    T* gC = (T*)a.gC;
    T* gD = (T*)a.gD;
    const int64_t blocks = (D + BLOCK - 1) / BLOCK;
    std::vector<T> states((size_t)L * N * BLOCK);
    V h[MAX_STATE], x[MAX_STATE], decay[MAX_STATE], Av[MAX_STATE], gAv[MAX_STATE];
    for (int64_t item = item0; item < item1; ++item) {
        const int64_t s = item / blocks, blk = item % blocks, d0 = blk * BLOCK;
        const int64_t w = D - d0 < BLOCK ? D - d0 : BLOCK;
        for (int64_t n = 0; n < N; ++n) {
            h[n] = V{};
            x[n] = V{};
            gAv[n] = V{};
            for (int64_t k = 0; k < BLOCK; ++k) {
                Av[n][k] = k < w ? A[(d0 + k) * N + n] : 0;
                decay[n][k] = Av[n][k] * (T)1.4426950408889634;
            }
        }
        const V skip = a.Dv ? load<V>((const T*)a.Dv + d0, w) : V{};
        const int64_t base = s * L * D + d0;
        for (int64_t t = 0; t < L; ++t) {
            const V dd = load<V>(dl + base + t * D, w);
            const V du = dd * load<V>(u + base + t * D, w);
            const T* bp = Bm + (s * L + t) * N;
            T* hp = states.data() + t * N * BLOCK;
            for (int64_t n = 0; n < N; ++n) {
                h[n] = vexp2(dd * decay[n]) * h[n] + du * bp[n];
                std::memcpy(hp + n * BLOCK, &h[n], sizeof(V));
            }
        }
        V gDv = V{};
        for (int64_t t = L - 1; t >= 0; --t) {
            const V uu = load<V>(u + base + t * D, w);
            const V dd = load<V>(dl + base + t * D, w);
            const V du = dd * uu;
            const V g = load<V>(gy + base + t * D, w);
            const T* bp = Bm + (s * L + t) * N;
            const T* cp = Cm + (s * L + t) * N;
            const T* hp = states.data() + t * N * BLOCK;
            V gs = g;
            if (z) {
                V out = skip * uu;
                for (int64_t n = 0; n < N; ++n) out += load<V>(hp + n * BLOCK, BLOCK) * cp[n];
                const V zz = load<V>(z + base + t * D, w);
                const V sig = 1 / (1 + vexp(-zz));
                gs = g * zz * sig;
                store(gz + base + t * D, g * out * sig * (1 + zz * (1 - sig)), w);
            }
            gDv += gs * uu;
            V gu_t = gs * skip, gd_t = V{};
            T* gbp = gB + ((s * blocks + blk) * L + t) * N;
            T* gcp = gC + ((s * blocks + blk) * L + t) * N;
            for (int64_t n = 0; n < N; ++n) {
                const V ht = load<V>(hp + n * BLOCK, BLOCK);
                const V hprev = t > 0 ? load<V>(hp - N * BLOCK + n * BLOCK, BLOCK) : V{};
                x[n] += gs * cp[n];
                gcp[n] = hsum(gs * ht);
                gbp[n] = hsum(x[n] * du);
                const V decayed = vexp2(dd * decay[n]);
                const V ah = decayed * hprev;
                gd_t += x[n] * (Av[n] * ah + uu * bp[n]);
                gAv[n] += x[n] * dd * ah;
                gu_t += x[n] * dd * bp[n];
                x[n] *= decayed;
            }
            store(gu + base + t * D, gu_t, w);
            store(gdl + base + t * D, gd_t, w);
        }
        for (int64_t n = 0; n < N; ++n)
            for (int64_t k = 0; k < w; ++k) gA[(s * D + d0 + k) * N + n] = gAv[n][k];
        store(gD + s * D + d0, gDv, w);
    }
}

template <typename T, typename V>
void conv_items(const ConvArgs& a, int64_t item0, int64_t item1) {
    const int64_t L = a.L, D = a.D, K = a.K;
    const T* x = (const T*)a.x;
    const T* wp = (const T*)a.w;
    T* out = (T*)a.out;
    const int64_t blocks = (D + BLOCK - 1) / BLOCK;
    V wt[MAX_RANK];
    for (int64_t item = item0; item < item1; ++item) {
        const int64_t s = item / blocks, d0 = (item % blocks) * BLOCK;
        const int64_t w = D - d0 < BLOCK ? D - d0 : BLOCK;
        for (int64_t j = 0; j < K; ++j)
            for (int64_t k = 0; k < BLOCK; ++k) wt[j][k] = k < w ? wp[(d0 + k) * K + j] : 0;
        const V bias = a.b ? load<V>((const T*)a.b + d0, w) : V{};
        for (int64_t t = 0; t < L; ++t) {
            V acc = bias;
            for (int64_t j = 0; j < K; ++j) {
                const int64_t src = a.reverse ? t + (K - 1) - j : t - (K - 1) + j;
                if (src >= 0 && src < L) acc += wt[j] * load<V>(x + s * a.xs + src * a.xt + d0, w);
            }
            store(out + (s * L + t) * D + d0, silu(acc), w);
        }
    }
}

// Float32 with 16 states (Mamba's default) runs the variant whose state loop is unrolled.
template <typename Args, typename Fixed, typename Any>
void by_state_size(const Args* a, int64_t items, int64_t threads, Fixed fixed, Any any) {
    if (a->N == 16) {
        parallel(a, items, threads, fixed);
    } else {
        parallel(a, items, threads, any);
    }
}

}  // namespace

extern "C" {
void scan_f32(const ScanArgs* a, int64_t items, int64_t threads) {
    by_state_size(a, items, threads, scan_items<float, vf, 16>, scan_items<float, vf, 0>);
}
void scan_f64(const ScanArgs* a, int64_t items, int64_t threads) {
    parallel(a, items, threads, scan_items<double, vd, 0>);
}
void scan_grad_f32(const GradArgs* a, int64_t items, int64_t threads) {
    by_state_size(a, items, threads, grad_items<float, vf, 16>, grad_items<float, vf, 0>);
}
void scan_grad_f64(const GradArgs* a, int64_t items, int64_t threads) {
    parallel(a, items, threads, grad_items<double, vd, 0>);
}
}
EXPORT_PARALLEL(conv, ConvArgs, conv_items)
"""

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class _ScanArgs(ctypes.Structure):
    _fields_ = [
        *[(k, _i64) for k in ("L", "D", "N", "R")],
        ("u", _ptr), ("us", _i64), ("ut", _i64),
        ("delta", _ptr), ("ds", _i64), ("dt", _i64), ("dr", _i64),
        ("dt_w", _ptr), ("dt_b", _ptr),
        ("A", _ptr),
        ("B", _ptr), ("bs", _i64), ("bt", _i64), ("bn", _i64),
        ("C", _ptr), ("cs", _i64), ("ct", _i64), ("cn", _i64),
        ("Dv", _ptr),
        ("z", _ptr), ("zs", _i64), ("zt", _i64),
        ("y", _ptr),
        ("reverse", _i64),
    ]  # fmt: skip


class _GradArgs(ctypes.Structure):
    _fields_ = [
        *[(k, _i64) for k in ("L", "D", "N")],
        *[(k, _ptr) for k in ("u", "delta", "A", "B", "C", "Dv", "z", "gy")],
        *[(k, _ptr) for k in ("gu", "gdelta", "gA", "gB", "gC", "gD", "gz")],
    ]


class _ConvArgs(ctypes.Structure):
    _fields_ = [
        ("L", _i64), ("D", _i64), ("K", _i64),
        ("x", _ptr), ("xs", _i64), ("xt", _i64),
        ("w", _ptr), ("b", _ptr),
        ("out", _ptr),
        ("reverse", _i64),
    ]  # fmt: skip


_LIBRARY = NativeLibrary(
    "selective_scan",
    _SOURCE,
    {"scan": _ScanArgs, "scan_grad": _GradArgs, "conv": _ConvArgs},
)


def available() -> bool:
    """Whether the kernel is compiled and loaded (compiles it on the first call)."""
    return _LIBRARY.available()


def build_error() -> str | None:
    """Why :func:`available` is False, if it is."""
    return _LIBRARY.build_error()


def supports(x: torch.Tensor, n_state: int = 0, rank: int = 0, width: int = 0) -> bool:
    """Whether the kernels take tensors like ``x`` with ``n_state`` states, a step-size
    projection of rank ``rank`` and a convolution of ``width`` taps."""
    return max(n_state, rank, width) <= _MAX_STATE and _LIBRARY.takes(x)


def scan_tokens(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_weight: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    reverse: bool = False,
) -> torch.Tensor:
    """``y_t = (sum_n C_t h_t + D u_t) * silu(z_t)`` over ``[S, L, D]`` inputs.

    ``delta`` is either the step size ``[S, L, D]`` (positive: bias and softplus applied) or,
    with ``dt_weight`` ``[D, R]``, the low-rank input ``[S, L, R]`` of Mamba's
    ``softplus(delta @ dt_weight^T + dt_bias)``. ``reverse`` runs the recurrence from the
    last step to the first. Returns ``[S, L, D]`` contiguous.
    """
    if not available():
        raise RuntimeError(f"the selective-scan kernel is not available: {build_error()}")
    dtype = u.dtype
    s, length, d = u.shape
    u = unit_stride_last(u, dtype)
    delta = delta.to(dtype) if dt_weight is not None else unit_stride_last(delta, dtype)
    B, C = B.to(dtype), C.to(dtype)
    z = None if z is None else unit_stride_last(z, dtype)
    A = A.to(dtype).contiguous()
    D, dt_weight, dt_bias = (
        None if t is None else t.to(dtype).contiguous() for t in (D, dt_weight, dt_bias)
    )
    y = torch.empty(s, length, d, dtype=dtype)
    args = _ScanArgs(
        length, d, A.shape[1], 0 if dt_weight is None else dt_weight.shape[1],
        addr(u), u.stride(0), u.stride(1),
        addr(delta), delta.stride(0), delta.stride(1), delta.stride(2),
        addr(dt_weight), addr(dt_bias),
        addr(A),
        addr(B), *B.stride(),
        addr(C), *C.stride(),
        addr(D),
        addr(z), *(z.stride()[:2] if z is not None else (0, 0)),
        addr(y),
        int(reverse),
    )  # fmt: skip
    _LIBRARY.run("scan", dtype, args, s * -(-d // BLOCK), s * length * d * A.shape[1])
    return y


def scan_tokens_grad(
    grad: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Gradients of :func:`scan_tokens` (``delta`` the step size ``[S, L, D]``, forward
    direction) with respect to ``u, delta, A, B, C, D, z``, given ``grad`` ``[S, L, D]`` of
    its output; ``None`` for an absent ``D`` or ``z``.

    Every (sequence, 16-channel block) recomputes its forward states into an ``[L, N, 16]``
    buffer and runs the recurrence backwards (Gu & Dao 2023, Algorithm 2 / S6). Sums across
    channels and sequences are written as per-item partial sums and added here, so threads
    never share an output. Returns, in the order of the inputs, ``gu``, ``gdelta``
    ``[S, L, D]``, ``gA`` ``[D, N]``, ``gB``, ``gC`` ``[S, L, N]``, ``gD`` ``[D]``, ``gz``
    ``[S, L, D]``.
    """
    if not available():
        raise RuntimeError(f"the selective-scan kernel is not available: {build_error()}")
    dtype = u.dtype
    s, length, d = u.shape
    n = A.shape[1]
    blocks = -(-d // BLOCK)
    u, delta, grad, B, C = (t.to(dtype).contiguous() for t in (u, delta, grad, B, C))
    A = A.to(dtype).contiguous()
    D = None if D is None else D.to(dtype).contiguous()
    z = None if z is None else z.to(dtype).contiguous()
    gu, gdelta = torch.empty_like(u), torch.empty_like(u)
    gz = None if z is None else torch.empty_like(u)
    gA = torch.empty(s, d, n, dtype=dtype)
    gB = torch.empty(s, blocks, length, n, dtype=dtype)
    gC = torch.empty(s, blocks, length, n, dtype=dtype)
    gD = torch.empty(s, d, dtype=dtype)
    args = _GradArgs(
        length, d, n,
        *(addr(t) for t in (u, delta, A, B, C, D, z, grad)),
        *(addr(t) for t in (gu, gdelta, gA, gB, gC, gD, gz)),
    )  # fmt: skip
    _LIBRARY.run("scan_grad", dtype, args, s * blocks, 3 * s * length * d * n)
    return (
        gu,
        gdelta,
        gA.sum(0),
        gB.sum(1),
        gC.sum(1),
        None if D is None else gD.sum(0),
        gz,
    )


def conv_silu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, reverse: bool = False
) -> torch.Tensor:
    """``silu`` of Mamba's depthwise causal convolution of ``x`` ``[S, L, D]`` with
    ``weight`` ``[D, K]`` (anti-causal with ``reverse``). Returns ``[S, L, D]``."""
    dtype = x.dtype
    x = unit_stride_last(x, dtype)
    s, length, d = x.shape
    weight = weight.to(dtype).contiguous()
    bias = None if bias is None else bias.to(dtype).contiguous()
    out = torch.empty(s, length, d, dtype=dtype)
    args = _ConvArgs(
        length, d, weight.shape[1], addr(x), x.stride(0), x.stride(1),
        addr(weight), addr(bias), addr(out), int(reverse),
    )  # fmt: skip
    _LIBRARY.run("conv", dtype, args, s * -(-d // BLOCK), s * length * d)
    return out
