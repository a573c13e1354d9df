"""C++ CPU kernels compiled on first use and loaded with :mod:`ctypes`.

A :class:`NativeLibrary` holds one C++ source. Its first use compiles it (under a second or
two) with the system's C++ compiler into the user's cache folder
(``$XDG_CACHE_HOME/core-attention``, else ``~/.cache/core-attention``), under a name keyed
by the source and the flags, and loads it; :meth:`NativeLibrary.available` is False where
there is no compiler or the build fails, and callers then take their PyTorch path.

Sources start with :data:`PRELUDE`: 16-lane vector types (one AVX-512 register of float32),
Cephes' single-precision ``exp``/``log1p`` polynomials (about 1 ulp) written without
library calls so that they vectorise, float64 lane-by-lane library versions (the tests'
reference precision), loads and stores of partial blocks, and ``parallel``: work items
shared by OpenMP threads of the runtime PyTorch already runs (built with ``-fopenmp``, the
library uses the ``libgomp`` PyTorch has loaded), so kernels and PyTorch never compete for
cores.

Every kernel is exported twice, ``<name>_f32`` and ``<name>_f64``, with the signature
``void f(const Args*, int64_t items, int64_t threads)``: a ``ctypes.Structure`` of sizes,
pointers and strides, the number of work items and the threads to share them.
:meth:`NativeLibrary.run` calls the one for a dtype on ``torch.get_num_threads()`` threads
(one for small work) under a profiler label.
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

__all__ = [
    "BLOCK",
    "PRELUDE",
    "NativeLibrary",
    "addr",
    "cache_dir",
    "compile_flags",
    "tracing",
    "unit_stride_last",
]

_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}

BLOCK = 16  # lanes of the vector types: one 512-bit register of float32

PRELUDE = r"""
#include <cmath>
#include <cstdint>
#include <cstring>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int BLOCK = 16;

typedef float vf __attribute__((vector_size(BLOCK * sizeof(float))));
typedef double vd __attribute__((vector_size(BLOCK * sizeof(double))));
typedef int32_t vi __attribute__((vector_size(BLOCK * sizeof(int32_t))));

// Nearest integer of x, and p 2^n for integral n: AVX-512's roundscale and scalef, else
// the magic-number rounding and the construction of 2^n's exponent bits.
inline vf vround(vf x) {
#if defined(__AVX512F__)
    return (vf)_mm512_roundscale_ps((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    return (x + 12582912.0f) - 12582912.0f;
#endif
}

inline vf vscale2(vf p, vf n) {
#if defined(__AVX512F__)
    return (vf)_mm512_scalef_ps((__m512)p, (__m512)n);
#else
    vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    return p * (vf)bits;
#endif
}

// exp clamps its argument to [-87, 88] and rounds x log2(e) to the nearest integer n;
// exp(x) = 2^n exp(x - n ln 2), the latter a polynomial.
inline vf vexp(vf x) {
    const vf lo = vf{} - 87.0f, hi = vf{} + 88.0f;
    x = x < lo ? lo : (x > hi ? hi : x);
    const vf fx = vround(x * 1.44269504088896341f);
    vf r = x - fx * 0.693359375f + fx * 2.12194440e-4f;
    vf p = vf{} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return vscale2(p, fx);
}

// 2^y for y clamped to [-126, 127]: 2^n 2^r with n = round(y), r in [-1/2, 1/2] and 2^r
// the degree-6 Chebyshev interpolant (relative error 3e-9 in exact arithmetic, about 1 ulp in
// float32). Kernels that fold log2(e) into a factor they apply anyway (a step size, a softmax
// scale) compute exp with four operations fewer than vexp.
inline vf vexp2(vf y) {
    const vf lo = vf{} - 126.0f, hi = vf{} + 127.0f;
    y = y < lo ? lo : (y > hi ? hi : y);
    const vf n = vround(y);
    const vf r = y - n;
    vf p = vf{} + 1.546144472481e-4f;
    p = p * r + 1.340042817771e-3f;
    p = p * r + 9.618056678432e-3f;
    p = p * r + 5.550327226670e-2f;
    p = p * r + 2.402265092229e-1f;
    p = p * r + 6.931472067028e-1f;
    p = p * r + 1.0f;
    return vscale2(p, n);
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

inline vd vexp(vd x) {
    for (int k = 0; k < BLOCK; ++k) x[k] = std::exp(x[k]);
    return x;
}

inline vd vexp2(vd x) {
    for (int k = 0; k < BLOCK; ++k) x[k] = std::exp2(x[k]);
    return x;
}

inline vd vlog1p(vd x) {
    for (int k = 0; k < BLOCK; ++k) x[k] = std::log1p(x[k]);
    return x;
}

// Loads and stores of the w <= 16 lanes of a block, one vector move when w = 16.
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
inline auto hmax(V v) {
    auto m = v[0];
    for (int k = 1; k < BLOCK; ++k) m = v[k] > m ? v[k] : m;
    return m;
}

template <typename V>
inline auto hsum(V v) {
    auto s = v[0];
    for (int k = 1; k < BLOCK; ++k) s += v[k];
    return s;
}

// Items handed out a few at a time, so that a thread the OS deschedules (a loaded machine)
// does not keep the others spinning at the end of the loop.
template <typename Args, typename Fn>
void parallel(const Args* a, int64_t items, int64_t threads, Fn fn) {
    if (threads <= 1) {
        fn(*a, 0, items);
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(dynamic, 4)
    for (int64_t i = 0; i < items; i += 4) fn(*a, i, i + 4 < items ? i + 4 : items);
}

// Thread k of n takes the k-th of n equal runs of items, in order: for kernels whose
// consecutive items share data (a weight panel, neighbouring rows), which parallel()'s
// interleaved chunks would scatter across the cores.
template <typename Args, typename Fn>
void parallel_runs(const Args* a, int64_t items, int64_t threads, Fn fn) {
    if (threads <= 1) {
        fn(*a, 0, items);
        return;
    }
#pragma omp parallel num_threads(threads)
    {
        const int64_t k = omp_get_thread_num(), n = omp_get_num_threads();
        fn(*a, items * k / n, items * (k + 1) / n);
    }
}

}  // namespace

// The two entries NativeLibrary.run calls, NAME_f32 and NAME_f64 (f(&args, items, threads)):
// EXPORT_DISPATCH runs RUN<float, vf> / RUN<double, vd>(&args, items, threads);
// EXPORT_PARALLEL runs parallel() over ITEMS<float, vf, ...> / ITEMS<double, vd, ...>, the
// optional arguments being further template arguments of ITEMS; EXPORT_RUNS runs
// parallel_runs() over ITEMS<float, vf> / ITEMS<double, vd>.
#define EXPORT_DISPATCH(NAME, ARGS, RUN)                                             \
    extern "C" void NAME##_f32(const ARGS* a, int64_t items, int64_t threads) {    \
        RUN<float, vf>(a, items, threads);                                           \
    }                                                                                \
    extern "C" void NAME##_f64(const ARGS* a, int64_t items, int64_t threads) {    \
        RUN<double, vd>(a, items, threads);                                          \
    }
#define EXPORT_RUNS(NAME, ARGS, ITEMS)                                               \
    extern "C" void NAME##_f32(const ARGS* a, int64_t items, int64_t threads) {    \
        parallel_runs(a, items, threads, ITEMS<float, vf>);                          \
    }                                                                                \
    extern "C" void NAME##_f64(const ARGS* a, int64_t items, int64_t threads) {    \
        parallel_runs(a, items, threads, ITEMS<double, vd>);                         \
    }
#define EXPORT_PARALLEL(NAME, ARGS, ITEMS, ...)                                      \
    extern "C" void NAME##_f32(const ARGS* a, int64_t items, int64_t threads) {    \
        parallel(a, items, threads, ITEMS<float, vf, ##__VA_ARGS__>);                \
    }                                                                                \
    extern "C" void NAME##_f64(const ARGS* a, int64_t items, int64_t threads) {    \
        parallel(a, items, threads, ITEMS<double, vd, ##__VA_ARGS__>);               \
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


def compile_flags() -> list[str]:
    """Compiler flags: optimisation, OpenMP, and the instruction sets ATen uses here."""
    return _FLAGS + _ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])


def cache_dir() -> Path:
    """Where compiled libraries are kept."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "core-attention"


def _compile(source: str, path: Path) -> None:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        src = Path(tmp) / f"{path.stem}.cpp"
        src.write_text(source)
        out = Path(tmp) / path.name
        cmd = [cxx, *compile_flags(), "-fPIC", "-shared", "-o", str(out), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr.strip()}")
        os.replace(out, path)  # atomic: concurrent processes never load a partial file


class NativeLibrary:
    """One C++ source (:data:`PRELUDE` is prepended), compiled and loaded on first use.

    Args:
        name: file name stem of the compiled library.
        source: C++ code defining ``extern "C"`` functions.
        functions: kernel name -> its ``ctypes.Structure`` argument type; the source exports
            ``<kernel>_f32`` and ``<kernel>_f64``.
    """

    def __init__(self, name: str, source: str, functions: dict[str, type]) -> None:
        self.name = name
        self.source = PRELUDE + source
        self.functions = dict(functions)
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self._error: str | None = None
        self._loaded = False
        self._functions: dict[tuple[str, torch.dtype], ctypes._CFuncPtr] = {}

    def _load(self) -> ctypes.CDLL | None:
        if self._loaded:  # set last, under the lock: every call after the first
            return self._lib
        with self._lock:
            if not self._loaded:
                key = hashlib.sha256((self.source + " ".join(compile_flags())).encode())
                path = cache_dir() / f"{self.name}_{key.hexdigest()[:16]}.so"
                try:
                    if not path.exists():
                        _compile(self.source, path)
                    lib = ctypes.CDLL(str(path))
                    for kernel, struct in self.functions.items():
                        for suffix in _SUFFIX.values():
                            fn = getattr(lib, f"{kernel}_{suffix}")
                            fn.restype = None
                            fn.argtypes = [ctypes.POINTER(struct), ctypes.c_int64, ctypes.c_int64]
                    self._lib = lib
                except (OSError, RuntimeError, AttributeError) as exc:
                    self._error = str(exc)
                self._loaded = True
            return self._lib

    def available(self) -> bool:
        """Whether the library is compiled and loaded (compiles it on the first call)."""
        return self._load() is not None

    def takes(self, *tensors: torch.Tensor) -> bool:
        """Whether the kernels can run on ``tensors``: float32 or float64 on the CPU, no
        tracer recording (:func:`tracing`), the library available."""
        return (
            all(t.device.type == "cpu" and t.dtype in _SUFFIX for t in tensors)
            and not tracing(*tensors)
            and self.available()
        )

    def build_error(self) -> str | None:
        """Why :meth:`available` is False, if it is."""
        self._load()
        return self._error

    def run(
        self,
        kernel: str,
        dtype: torch.dtype,
        args: ctypes.Structure,
        items: int,
        work: int,
        min_shared_work: int = 1 << 16,
    ) -> None:
        """Call ``<kernel>_f32`` or ``_f64`` (by ``dtype``) as ``f(&args, items, threads)`` on
        ``torch.get_num_threads()`` threads, one when ``work`` (a count of inner-loop
        operations) is below ``min_shared_work``. Labelled ``<name>::<kernel>_<suffix>`` for
        :mod:`torch.profiler` while one records (the label costs several microseconds)."""
        fn = self._functions.get((kernel, dtype))
        if fn is None:
            lib = self._load()
            if lib is None:
                raise RuntimeError(f"the {self.name} kernels are not available: {self._error}")
            fn = self._functions[(kernel, dtype)] = getattr(lib, f"{kernel}_{_SUFFIX[dtype]}")
        threads = 1 if work < min_shared_work else max(1, min(torch.get_num_threads(), items))
        if torch._C._autograd._profiler_enabled():
            with torch.profiler.record_function(f"{self.name}::{kernel}_{_SUFFIX[dtype]}"):
                fn(ctypes.byref(args), items, threads)
        else:
            fn(ctypes.byref(args), items, threads)


def addr(t: torch.Tensor | None) -> int | None:
    """Data pointer of ``t`` for a ``ctypes`` pointer field (``None`` stays null)."""
    return None if t is None else t.data_ptr()


def unit_stride_last(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` with unit stride along its last dimension (a copy only if needed),
    the layout every kernel here vectorises over."""
    t = t.to(dtype)
    return t if t.stride(-1) == 1 else t.contiguous()


def tracing(*tensors: torch.Tensor) -> bool:
    """Whether a tracer is recording (torch.compile, torch.export, TorchScript) or any of
    ``tensors`` is a tracer's stand-in (fake or functional): a ``ctypes`` call would be
    invisible to it, so kernels of this module must not run then."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    return any(type(t) is not torch.Tensor for t in tensors)
