"""Compiled CPU kernels for the Mamba layers (Gu & Dao 2023, "Mamba: Linear-Time Sequence
Modeling with Selective State Spaces", Algorithm 2 / S6) of MambAttention (Kühne et al. 2025).

The step loop of :func:`~attn_speech.enhance.selective_scan.scan_fused` spends its time
streaming the ``[B, D, N]`` state through memory five times per step (exp, products, fused
multiply-add, matmul). :func:`scan_tokens` does one pass: for a block of 16 channels of one
sequence the state ``[N, 16]`` stays in registers and L1 for the whole sequence, and the step
size ``softplus(dt W^T + b)``, the skip term ``D u`` and the gate ``silu(z)`` are computed on
the way. :func:`conv_silu` is Mamba's depthwise causal convolution with its SiLU. Both read
the token-major output of Mamba's input projection as it is (no transposes or copies).

The C++ source below is compiled on first use (under a second) with the system's C++
compiler into the user's cache folder (``$XDG_CACHE_HOME/attn-speech``, else
``~/.cache/attn-speech``) and loaded with :mod:`ctypes`; :func:`available` is False where
there is no compiler or the build fails, and callers then use the PyTorch loop. Work is split
between ``torch.get_num_threads()`` OpenMP threads of the runtime PyTorch already runs (so
the two never compete for cores). Float32 uses polynomial ``exp``/``log1p`` (about 1 ulp);
float64 the C library.

Inference only: the kernels compute no gradients.

Shapes (token-major, unit stride along channels): ``u``, ``z``, ``y`` ``[S, L, D]``;
``B``, ``C`` ``[S, L, N]``; ``A`` ``[D, N]``; ``D`` ``[D]``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

__all__ = ["available", "build_error", "conv_silu", "scan_tokens", "supports"]

_BLOCK = 16  # channels per work item; one 512-bit vector of float32
_MAX_STATE = 64

_SOURCE = r"""
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int BLOCK = 16;
constexpr int MAX_STATE = 64;
constexpr int MAX_RANK = 64;

typedef float vf __attribute__((vector_size(BLOCK * sizeof(float))));
typedef double vd __attribute__((vector_size(BLOCK * sizeof(double))));
typedef int32_t vi __attribute__((vector_size(BLOCK * sizeof(int32_t))));

// Float32 exp and log1p for the 16 channels of a block (one AVX-512 register): Cephes'
// single-precision polynomials (about 1 ulp), without library calls so that they vectorise.
// exp clamps its argument to [-87, 88]; 1.5 * 2^23 rounds to the nearest integer.
inline vf vexp(vf x) {
    const vf lo = vf{} - 87.0f, hi = vf{} + 88.0f;
    x = x < lo ? lo : (x > hi ? hi : x);
    vf fx = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    vf r = x - fx * 0.693359375f + fx * 2.12194440e-4f;
    vf p = vf{} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    vi bits = (__builtin_convertvector(fx, vi) + 127) << 23;
    return p * (vf)bits;
}

// log1p(v) for v >= 0 as log(w) * v / (w - 1), w = 1 + v (exact where w rounds to 1).
inline vf vlog1p(vf v) {
    const vf w = v + 1.0f;
    vi bits = (vi)w;
    vf e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, vf);
    vf m = (vf)((bits & 0x007fffff) | 0x3f000000);  // w = m 2^e, m in [0.5, 1)
    const auto small = m < 0.707106781186547524f;
    e = small ? e - 1.0f : e;
    vf x = small ? m + m - 1.0f : m - 1.0f;
    vf z = x * x;
    vf y = vf{} + 7.0376836292e-2f;
    y = y * x - 1.1514610310e-1f;
    y = y * x + 1.1676998740e-1f;
    y = y * x - 1.2420140846e-1f;
    y = y * x + 1.4249322787e-1f;
    y = y * x - 1.6668057665e-1f;
    y = y * x + 2.0000714765e-1f;
    y = y * x - 2.4999993993e-1f;
    y = y * x + 3.3333331174e-1f;
    y = y * x * z - e * 2.12194440e-4f - 0.5f * z;
    const vf lg = x + y + e * 0.693359375f;
    const vf den = w - 1.0f;
    return den == 0.0f ? v : lg * (v / (den == 0.0f ? 1.0f : den));
}

// Float64 (the tests' reference precision): the library functions lane by lane.
inline vd vexp(vd x) {
    for (int k = 0; k < BLOCK; ++k) x[k] = std::exp(x[k]);
    return x;
}

inline vd vlog1p(vd x) {
    for (int k = 0; k < BLOCK; ++k) x[k] = std::log1p(x[k]);
    return x;
}

// Loads and stores of the w <= 16 channels of a block, one vector move when w = 16.
template <typename V, typename T>
inline V load(const T* p, int64_t w) {
    V v = {};
    if (w == BLOCK) {
        std::memcpy(&v, p, sizeof(V));
    } else {
        for (int64_t k = 0; k < w; ++k) v[k] = p[k];
    }
    return v;
}

template <typename V, typename T>
inline void store(T* p, V v, int64_t w) {
    if (w == BLOCK) {
        std::memcpy(p, &v, sizeof(V));
    } else {
        for (int64_t k = 0; k < w; ++k) p[k] = v[k];
    }
}

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

}

namespace {

template <typename T, typename V>
void scan_items(const ScanArgs& a, int64_t item0, int64_t item1) {
    const int64_t L = a.L, D = a.D, N = a.N, R = a.R;
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
            for (int64_t k = 0; k < BLOCK; ++k) decay[n][k] = k < w ? A[(d0 + k) * N + n] : 0;
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
            V acc = skip * uu;
            for (int64_t n = 0; n < N; ++n) {
                h[n] = vexp(dd * decay[n]) * h[n] + du * bp[n * a.bn];
                acc += h[n] * cp[n * a.cn];
            }
            if (z) acc *= silu(load<V>(z + s * a.zs + t * a.zt + d0, w));
            store(y + (s * L + t) * D + d0, acc, w);
        }
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

}  // namespace

// Work items shared by `threads` OpenMP threads: built with -fopenmp, the library uses the
// OpenMP runtime (libgomp.so.1) that PyTorch has loaded, and with it its threads. Items are
// handed out a few at a time, so that a thread the OS deschedules (a loaded machine) does
// not keep the others spinning at the end of the loop.
template <typename Args, typename Fn>
void parallel(const Args* a, int64_t items, int64_t threads, Fn fn) {
    if (threads <= 1) {
        fn(*a, 0, items);
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(dynamic, 4)
    for (int64_t i = 0; i < items; i += 4) fn(*a, i, i + 4 < items ? i + 4 : items);
}

extern "C" {
void scan_f32(const ScanArgs* a, int64_t items, int64_t threads) {
    parallel(a, items, threads, scan_items<float, vf>);
}
void scan_f64(const ScanArgs* a, int64_t items, int64_t threads) {
    parallel(a, items, threads, scan_items<double, vd>);
}
void conv_f32(const ConvArgs* a, int64_t items, int64_t threads) {
    parallel(a, items, threads, conv_items<float, vf>);
}
void conv_f64(const ConvArgs* a, int64_t items, int64_t threads) {
    parallel(a, items, threads, conv_items<double, vd>);
}
}
"""

_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-Wno-psabi"]
# Instruction sets from what ATen dispatches to on this CPU, not -march=native: the cache
# folder may be shared by machines of different CPU generations.
_ISA_FLAGS = {
    "AVX512": [
        *("-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma"),
        "-mprefer-vector-width=512",
    ],
    "AVX2": ["-mavx2", "-mfma"],
}


def _flags() -> list[str]:
    return _FLAGS + _ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])


_lock = threading.Lock()
_state: dict[str, object] = {}

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


class _ConvArgs(ctypes.Structure):
    _fields_ = [
        ("L", _i64), ("D", _i64), ("K", _i64),
        ("x", _ptr), ("xs", _i64), ("xt", _i64),
        ("w", _ptr), ("b", _ptr),
        ("out", _ptr),
        ("reverse", _i64),
    ]  # fmt: skip


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "attn-speech"


def _compile(path: Path) -> None:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        src = Path(tmp) / "scan.cpp"
        src.write_text(_SOURCE)
        out = Path(tmp) / path.name
        cmd = [cxx, *_flags(), "-fPIC", "-shared", "-o", str(out), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr.strip()}")
        os.replace(out, path)  # atomic: concurrent processes never load a partial file


def _library() -> ctypes.CDLL | None:
    with _lock:
        if "lib" not in _state:
            key = hashlib.sha256((_SOURCE + " ".join(_flags())).encode()).hexdigest()[:16]
            path = _cache_dir() / f"selective_scan_{key}.so"
            try:
                if not path.exists():
                    _compile(path)
                lib = ctypes.CDLL(str(path))
                for name, args in (("scan", _ScanArgs), ("conv", _ConvArgs)):
                    for suffix in ("f32", "f64"):
                        fn = getattr(lib, f"{name}_{suffix}")
                        fn.restype = None
                        fn.argtypes = [ctypes.POINTER(args), _i64, _i64]
                _state["lib"] = lib
            except (OSError, RuntimeError) as exc:
                _state["lib"] = None
                _state["error"] = str(exc)
        return _state["lib"]  # type: ignore[return-value]


def available() -> bool:
    """Whether the kernel is compiled and loaded (compiles it on the first call)."""
    return _library() is not None


def build_error() -> str | None:
    """Why :func:`available` is False, if it is."""
    _library()
    return _state.get("error")  # type: ignore[return-value]


def supports(x: torch.Tensor, n_state: int = 0, rank: int = 0, width: int = 0) -> bool:
    """Whether the kernels take tensors like ``x`` with ``n_state`` states, a step-size
    projection of rank ``rank`` and a convolution of ``width`` taps."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and max(n_state, rank, width) <= _MAX_STATE
        and available()
    )


def _run(name: str, dtype: torch.dtype, args: ctypes.Structure, items: int, work: int) -> None:
    """Run ``items`` work items on torch's number of threads (one when ``work`` is small)."""
    fn = getattr(_library(), f"{name}_{'f32' if dtype == torch.float32 else 'f64'}")
    threads = 1 if work < 1 << 16 else max(1, min(torch.get_num_threads(), items))
    with torch.profiler.record_function(f"attn_speech::{name}_kernel"):
        fn(ctypes.byref(args), items, threads)


def _unit_last(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = t.to(dtype)
    return t if t.stride(-1) == 1 else t.contiguous()


def _addr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


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
    if _library() is None:
        raise RuntimeError(f"the selective-scan kernel is not available: {build_error()}")
    dtype = u.dtype
    s, length, d = u.shape
    u = _unit_last(u, dtype)
    delta = delta.to(dtype) if dt_weight is not None else _unit_last(delta, dtype)
    B, C = B.to(dtype), C.to(dtype)
    z = None if z is None else _unit_last(z, dtype)
    A = A.to(dtype).contiguous()
    D, dt_weight, dt_bias = (
        None if t is None else t.to(dtype).contiguous() for t in (D, dt_weight, dt_bias)
    )
    y = torch.empty(s, length, d, dtype=dtype)
    args = _ScanArgs(
        length, d, A.shape[1], 0 if dt_weight is None else dt_weight.shape[1],
        _addr(u), u.stride(0), u.stride(1),
        _addr(delta), delta.stride(0), delta.stride(1), delta.stride(2),
        _addr(dt_weight), _addr(dt_bias),
        _addr(A),
        _addr(B), *B.stride(),
        _addr(C), *C.stride(),
        _addr(D),
        _addr(z), *(z.stride()[:2] if z is not None else (0, 0)),
        _addr(y),
        int(reverse),
    )  # fmt: skip
    _run("scan", dtype, args, s * -(-d // _BLOCK), s * length * d * A.shape[1])
    return y


def conv_silu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, reverse: bool = False
) -> torch.Tensor:
    """``silu`` of Mamba's depthwise causal convolution of ``x`` ``[S, L, D]`` with
    ``weight`` ``[D, K]`` (anti-causal with ``reverse``). Returns ``[S, L, D]``."""
    dtype = x.dtype
    x = _unit_last(x, dtype)
    s, length, d = x.shape
    weight = weight.to(dtype).contiguous()
    bias = None if bias is None else bias.to(dtype).contiguous()
    out = torch.empty(s, length, d, dtype=dtype)
    args = _ConvArgs(
        length, d, weight.shape[1], _addr(x), x.stride(0), x.stride(1),
        _addr(weight), _addr(bias), _addr(out), int(reverse),
    )  # fmt: skip
    _run("conv", dtype, args, s * -(-d // _BLOCK), s * length * d)
    return out
