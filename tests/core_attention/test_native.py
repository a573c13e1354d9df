"""core_attention.native: building, caching, and the fallback without a compiler."""

from __future__ import annotations

import ctypes
import textwrap

import torch

from core_attention.native import NativeLibrary, addr


class _ScaleArgs(ctypes.Structure):
    _fields_ = [("n", ctypes.c_int64), ("x", ctypes.c_void_p), ("y", ctypes.c_void_p)]


_SOURCE = r"""
extern "C" {
struct ScaleArgs { int64_t n; const void* x; void* y; };
}
namespace {
template <typename T, typename V>
void exp_items(const ScaleArgs& a, int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
        const int64_t w = a.n - i * BLOCK < BLOCK ? a.n - i * BLOCK : BLOCK;
        store((T*)a.y + i * BLOCK, vexp(load<V>((const T*)a.x + i * BLOCK, w)), w);
    }
}
}
extern "C" void vexp_f32(const ScaleArgs* a, int64_t items, int64_t threads) {
    parallel(a, items, threads, exp_items<float, vf>);
}
extern "C" void vexp_f64(const ScaleArgs* a, int64_t items, int64_t threads) {
    parallel(a, items, threads, exp_items<double, vd>);
}
"""


def test_builds_once_into_the_cache_and_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    lib = NativeLibrary("native_test", _SOURCE, {"vexp": _ScaleArgs})
    assert lib.available(), lib.build_error()
    built = list((tmp_path / "core-attention").glob("native_test_*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    again = NativeLibrary("native_test", _SOURCE, {"vexp": _ScaleArgs})
    for dtype, rtol in ((torch.float32, 3e-7), (torch.float64, 1e-15)):
        x = torch.linspace(-80, 80, 1001, dtype=dtype)
        y = torch.full_like(x, float("nan"))
        args = _ScaleArgs(x.numel(), addr(x), addr(y))
        again.run("vexp", dtype, args, -(-x.numel() // 16), 1 << 20)
        torch.testing.assert_close(y.double(), x.double().exp(), rtol=rtol, atol=0)
    assert built[0].stat().st_mtime_ns == stamp  # loaded from the cache, not rebuilt


def test_without_a_compiler_attention_takes_the_pytorch_path(without_compiler):
    script = textwrap.dedent(
        """
        import torch
        from core_attention import attention, cpu_attention

        assert not cpu_attention.available()
        print(cpu_attention.build_error())
        q = torch.randn(2, 3, 9, 8)
        with torch.no_grad():
            out = attention(q, q, q)
        ref = torch.softmax(q @ q.transpose(-1, -2) * 8**-0.5, -1) @ q
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        print("fallback ok")
        """
    )
    out = without_compiler(script)
    assert "fallback ok" in out and "no-such-compiler" in out
