"""InstanceNorm + PReLU in one compiled CPU pass, for MP-SENet's convolution blocks (Lu et al.
2023, the dense encoder and decoders of MambAttention, Kühne et al. 2025). Inference only.

PyTorch runs ``InstanceNorm2d`` and ``PReLU`` as two passes that each allocate a feature map
(``[B, C, T, F]``, tens of MB at 4 s), and the dense blocks then copy the result into their
concatenation buffer. :func:`instance_norm_prelu` reads each ``(b, c)`` plane once from
memory (the statistics passes and the output pass then hit cache: a plane of a 4 s chunk is
about 0.5 MB) and writes the result where the caller wants it, e.g. a slice of that buffer.
Statistics are computed in two passes (mean, then the mean squared deviation) with float64
sums, as precise as PyTorch's.

Shapes: ``x`` ``[B, C, H, W]`` contiguous; ``out`` ``[B, C, H, W]`` with contiguous planes
(any batch and channel strides). Float32 and float64.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from core_attention.native import NativeLibrary, addr

__all__ = ["available", "instance_norm_prelu", "supports"]

_SOURCE = r"""
extern "C" {
struct NormArgs {
    int64_t C, P;
    const void* x;
    const void* gamma; const void* beta; const void* alpha; int64_t alpha_stride;
    double eps;
    void* out; int64_t ob, oc;
};
}

namespace {

template <typename T, typename V>
void norm_items(const NormArgs& a, int64_t item0, int64_t item1) {
    const int64_t P = a.P, full = P / BLOCK * BLOCK;
    for (int64_t item = item0; item < item1; ++item) {
        const int64_t b = item / a.C, c = item % a.C;
        const T* x = (const T*)a.x + item * P;
        T* out = (T*)a.out + b * a.ob + c * a.oc;
        double total = 0;
        for (int64_t i0 = 0; i0 < P; i0 += 4096) {  // float sums of 4096 terms, then double
            const int64_t i1 = i0 + 4096 < full ? i0 + 4096 : full;
            V s = V{};
            for (int64_t i = i0; i < i1; i += BLOCK) s += load<V>(x + i, BLOCK);
            total += hsum(s);
        }
        for (int64_t i = full; i < P; ++i) total += x[i];
        const T mean = (T)(total / P);
        double dev = 0;
        for (int64_t i0 = 0; i0 < P; i0 += 4096) {
            const int64_t i1 = i0 + 4096 < full ? i0 + 4096 : full;
            V s = V{};
            for (int64_t i = i0; i < i1; i += BLOCK) {
                const V d = load<V>(x + i, BLOCK) - mean;
                s += d * d;
            }
            dev += hsum(s);
        }
        for (int64_t i = full; i < P; ++i) dev += (double)(x[i] - mean) * (x[i] - mean);
        const T inv = (T)(1.0 / std::sqrt(dev / P + a.eps));
        const T scale = inv * ((const T*)a.gamma)[c];
        const T shift = ((const T*)a.beta)[c] - mean * scale;
        const T slope = ((const T*)a.alpha)[c * a.alpha_stride];
        for (int64_t i = 0; i < P; i += BLOCK) {
            const int64_t w = P - i < BLOCK ? P - i : BLOCK;
            const V y = load<V>(x + i, w) * scale + shift;
            store(out + i, y > 0 ? y : y * slope, w);
        }
    }
}

}  // namespace

EXPORT_PARALLEL(norm, NormArgs, norm_items)
"""

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class _NormArgs(ctypes.Structure):
    _fields_ = [
        ("C", _i64), ("P", _i64),
        ("x", _ptr),
        ("gamma", _ptr), ("beta", _ptr), ("alpha", _ptr), ("alpha_stride", _i64),
        ("eps", ctypes.c_double),
        ("out", _ptr), ("ob", _i64), ("oc", _i64),
    ]  # fmt: skip


_LIBRARY = NativeLibrary("instance_norm_prelu", _SOURCE, {"norm": _NormArgs})


def available() -> bool:
    """Whether the kernel is compiled and loaded (compiles it on the first call)."""
    return _LIBRARY.available()


def supports(x: torch.Tensor, norm: nn.Module, act: nn.Module) -> bool:
    """Whether :func:`instance_norm_prelu` computes ``act(norm(x))`` for these modules:
    CPU float32/float64 ``x``, an affine ``InstanceNorm2d`` that uses the statistics of
    its input, a ``PReLU``, no autograd."""
    return (
        isinstance(norm, nn.InstanceNorm2d)
        and isinstance(act, nn.PReLU)
        and norm.affine
        and (norm.training or not norm.track_running_stats)
        and act.weight.numel() in (1, x.shape[1])
        and x.dim() == 4
        and not (torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad))
        and _LIBRARY.takes(x)
    )


def instance_norm_prelu(
    x: torch.Tensor, norm: nn.InstanceNorm2d, act: nn.PReLU, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``act(norm(x))`` for ``x`` ``[B, C, H, W]``, written into ``out`` when given."""
    b, c, h, w = x.shape
    x = x.contiguous()
    if out is None:
        out = torch.empty_like(x)
    elif out.shape != x.shape or out.dtype != x.dtype or out.stride()[2:] != (w, 1):
        raise ValueError(
            f"out must be {tuple(x.shape)} {x.dtype} with contiguous planes, got "
            f"{tuple(out.shape)} {out.dtype} strides {out.stride()}"
        )
    gamma, beta, alpha = (
        p.detach().to(x.dtype).contiguous() for p in (norm.weight, norm.bias, act.weight)
    )
    args = _NormArgs(
        c, h * w, addr(x), addr(gamma), addr(beta), addr(alpha), int(alpha.numel() > 1),
        float(norm.eps), addr(out), out.stride(0), out.stride(1),
    )  # fmt: skip
    _LIBRARY.run("norm", x.dtype, args, b * c, x.numel())
    return out
