"""FlashAttention-2 (Dao 2023) in Triton, as PyTorch custom ops with autograd.

``flash_attn_func(q, k, v)`` computes ``softmax(q k^T * scale) v`` without materialising the
``Nq x Nk`` score matrix: the forward pass keeps a running max and sum per query row
(online softmax) and saves the row logsumexp; the backward pass recomputes the scores
block by block from it. Tensors use the layout of
:func:`torch.nn.functional.scaled_dot_product_attention`:

* ``q [B, H, Nq, D]``, ``k [B, H_kv, Nk, D]``, ``v [B, H_kv, Nk, Dv]``, ``H % H_kv == 0``;
  query head ``h`` uses key/value head ``h // (H // H_kv)`` (GQA / MQA without copies).
* ``causal=True`` masks keys after the query position, top-left aligned as
  ``scaled_dot_product_attention(is_causal=True)``.
* ``key_lengths [B]`` (integer): keys at positions ``>= key_lengths[b]`` are ignored.
* A row with no admissible key (only possible when ``key_lengths[b] == 0``) returns zeros
  and gets zero gradient.

Supported: CUDA tensors on compute capability 8.0 or newer (CPU tensors under
``TRITON_INTERPRET=1``); float16, bfloat16 and float32; ``D`` and ``Dv`` up to 256 (padded to
a power of two inside the kernels). float32 inputs are computed in float32 with full-precision
dot products when ``torch.get_float32_matmul_precision()`` is ``"highest"`` (PyTorch's
default) and with TF32 tensor-core dot products otherwise; softmax statistics and all
accumulators are float32 for every input dtype.

The ops are ``torch.ops.attention_kernels.flash_attn_fwd`` (returns ``(out, lse)``) and
``torch.ops.attention_kernels.flash_attn_bwd`` (returns ``(dq, dk, dv)``); both have fake
implementations, so ``torch.compile`` traces through them without graph breaks.

Set ``ATTENTION_KERNELS_POISON=1`` to allocate every output NaN-filled instead of
uninitialised (tests use it to catch elements a kernel never writes), and
``ATTENTION_KERNELS_CONFIG=<i>`` to skip autotuning and run the i-th config of each kernel's
list for the device (tests use it to check every config, and to save compile time).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import sys
from pathlib import Path

import torch

from attention_kernels import device_unsupported_reason, interpreter_enabled

__all__ = ["MAX_HEAD_DIM", "flash_attn_func", "unsupported_reason"]

MAX_HEAD_DIM = 256
POISON_ENV = "ATTENTION_KERNELS_POISON"
CONFIG_ENV = "ATTENTION_KERNELS_CONFIG"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Shared memory per block that the head-dim-256 configurations were sized for.
_BIG_HEAD_SMEM = 160 * 1024
_PREPROCESS_BLOCK_M = 64


@functools.cache
def _load_kernels(interpret: bool):
    name = f"attention_kernels._flash_triton_{'interpreted' if interpret else 'compiled'}"
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).with_name("_flash_triton.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _kernels():
    """The Triton kernels for the current ``TRITON_INTERPRET`` setting (built on first use).

    Triton reads ``TRITON_INTERPRET`` when ``@triton.jit`` decorates a function, so a single
    module-level definition would freeze whichever mode was active at import time.
    """
    return _load_kernels(interpreter_enabled())


@torch.compiler.assume_constant_result
def _cuda_limits(index: int) -> tuple[int, int, int]:
    props = torch.cuda.get_device_properties(index)
    return props.major, props.minor, props.shared_memory_per_block_optin


def unsupported_reason(q, k, v, *, key_lengths=None) -> str | None:
    """``None`` when the kernels can run ``flash_attn_func(q, k, v, ...)``, else why not."""
    tensors = [("q", q), ("k", k), ("v", v)]
    if key_lengths is not None:
        tensors.append(("key_lengths", key_lengths))
    device = q.device
    for name, t in tensors[1:]:
        if t.device != device and not (name == "key_lengths" and t.device.type == "cpu"):
            return f"{name} is on {t.device} but q is on {device}"
    why = device_unsupported_reason(device)
    if why is not None:
        return why
    if device.type == "cpu" and q.dtype == torch.bfloat16:
        # Seen with triton 3.5: the interpreter's tl.dot returns garbage for bfloat16.
        return "bfloat16 is not supported under the Triton interpreter (use float16 or float32)"
    if q.dtype not in _DTYPES:
        return f"dtype {q.dtype} is not supported (float16, bfloat16 or float32)"
    d, dv = q.shape[-1], v.shape[-1]
    if d > MAX_HEAD_DIM or dv > MAX_HEAD_DIM:
        return f"head dim {max(d, dv)} is larger than {MAX_HEAD_DIM}"
    if device.type == "cuda":
        major, minor, smem = _cuda_limits(device.index)
        if major < 8:
            return f"compute capability {major}.{minor} is below 8.0 (Ampere)"
        if max(d, dv) > 128 and smem < _BIG_HEAD_SMEM:
            return (
                f"head dim {max(d, dv)} > 128 needs {_BIG_HEAD_SMEM // 1024} KB of shared memory "
                f"per block, this GPU has {smem // 1024} KB"
            )
    return None


def _block(dim: int) -> int:
    return max(16, _next_power_of_2(dim))


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _bucket(n: int) -> int:
    """Autotuning key for a sequence length: its power-of-two ceiling, so variable-length
    workloads retune a handful of times rather than once per distinct length."""
    return _next_power_of_2(max(n, 1))


def _alloc(shape, dtype, device) -> torch.Tensor:
    if os.environ.get(POISON_ENV, "0") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _grid_empty(*sizes: int) -> bool:
    return any(s == 0 for s in sizes)


def _common_meta(q, k, v, key_lengths, causal):
    return {
        "HEAD_DIM": q.shape[-1],
        "HEAD_DIM_V": v.shape[-1],
        "BLOCK_D": _block(q.shape[-1]),
        "BLOCK_DV": _block(v.shape[-1]),
        "IS_CAUSAL": causal,
        "HAS_KEY_LENGTHS": key_lengths is not None,
        "INPUT_PRECISION": _input_precision(q.dtype),
    }


def _tuned(kern, kernel: str, q: torch.Tensor, meta: dict):
    """The autotuned kernel, or with ``ATTENTION_KERNELS_CONFIG=i`` the i-th config of the
    list autotuning would choose from (clamped to its last), without benchmarking."""
    tuned = {"fwd": kern._attn_fwd, "dkdv": kern._attn_bwd_dkdv, "dq": kern._attn_bwd_dq}[kernel]
    choice = os.environ.get(CONFIG_ENV, "auto")
    if choice == "auto" or interpreter_enabled():
        return tuned
    configs = kern._pruner(kernel)(tuned.configs, {"Q": q}, **meta)
    config = configs[min(int(choice), len(configs) - 1)]
    # tuned.fn is the kernel below the autotuner (with its heuristics, if any).
    return _WithConfig(tuned.fn, config)


class _WithConfig:
    def __init__(self, fn, config):
        self.fn, self.config = fn, config

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.fn[grid](*args, **kwargs, **self.config.all_kwargs())


def launch_forward(q, k, v, out, lse, key_lengths, causal: bool, scale: float) -> None:
    """Run the forward kernel into preallocated ``out [B, H, Nq, Dv]`` and ``lse [B, H, Nq]``
    (float32, contiguous). Inputs need stride 1 in their last dimension."""
    b, h, nq, _ = q.shape
    h_kv, nk = k.shape[1], k.shape[2]
    if _grid_empty(b, h, nq):
        return
    kern = _kernels()
    meta = _common_meta(q, k, v, key_lengths, causal)

    def grid(m):
        return (_cdiv(nq, m["BLOCK_M"]), b * h)

    _tuned(kern, "fwd", q, meta)[grid](
        q, k, v, out, lse, key_lengths, scale * math.log2(math.e),
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        h, h // h_kv, nq, nk, _bucket(nq), _bucket(nk), **meta,
    )  # fmt: skip


def launch_backward(
    dout, q, k, v, out, lse, delta, dq, dk, dv, key_lengths, causal: bool, scale: float
) -> None:
    """Run the three backward kernels into preallocated ``delta [B, H, Nq]`` (float32,
    contiguous scratch) and ``dq``, ``dk``, ``dv`` shaped like ``q``, ``k``, ``v``."""
    b, h, nq, _ = q.shape
    h_kv, nk = k.shape[1], k.shape[2]
    kern = _kernels()
    meta = _common_meta(q, k, v, key_lengths, causal)
    group = h // h_kv
    qk_scale = scale * math.log2(math.e)
    if not _grid_empty(b, h, nq):
        block_m = 32 if interpreter_enabled() else _PREPROCESS_BLOCK_M
        kern._attn_bwd_preprocess[(_cdiv(nq, block_m), b * h)](
            out, dout, delta, *out.stride()[:3], *dout.stride()[:3], h, nq,
            HEAD_DIM_V=meta["HEAD_DIM_V"], BLOCK_DV=meta["BLOCK_DV"], BLOCK_M=block_m,
        )  # fmt: skip
    if not _grid_empty(b, h_kv, nk):
        _tuned(kern, "dkdv", q, meta)[lambda m: (_cdiv(nk, m["BLOCK_N"]), b * h_kv)](
            q, k, v, dout, lse, delta, dk, dv, key_lengths, scale, qk_scale,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3],
            *dk.stride()[:3], *dv.stride()[:3],
            h, h_kv, group, nq, nk, _bucket(nq), _bucket(nk), **meta,
        )  # fmt: skip
    if not _grid_empty(b, h, nq):
        _tuned(kern, "dq", q, meta)[lambda m: (_cdiv(nq, m["BLOCK_M"]), b * h)](
            q, k, v, dout, lse, delta, dq, key_lengths, scale, qk_scale,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3],
            *dq.stride()[:3],
            h, group, nq, nk, _bucket(nq), _bucket(nk), **meta,
        )  # fmt: skip


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------
# Custom ops


@torch.library.custom_op("attention_kernels::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_lengths: torch.Tensor | None,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward pass: ``(out [B, H, Nq, Dv], lse [B, H, Nq] float32)``."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    b, h, nq, _ = q.shape
    out = _alloc((b, h, nq, v.shape[-1]), q.dtype, q.device)
    lse = _alloc((b, h, nq), torch.float32, q.device)
    launch_forward(q, k, v, out, lse, key_lengths, causal, scale)
    return out, lse


@flash_attn_fwd.register_fake
def _(q, k, v, key_lengths, causal, scale):
    b, h, nq, _ = q.shape
    return q.new_empty((b, h, nq, v.shape[-1])), q.new_empty((b, h, nq), dtype=torch.float32)


@torch.library.custom_op("attention_kernels::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_lengths: torch.Tensor | None,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward pass: ``(dq, dk, dv)`` shaped like ``(q, k, v)``."""
    dout, q, k, v, out = (_last_dim_contiguous(t) for t in (dout, q, k, v, out))
    delta = _alloc(lse.shape, torch.float32, q.device)
    dq = _alloc(q.shape, q.dtype, q.device)
    dk = _alloc(k.shape, k.dtype, k.device)
    dv = _alloc(v.shape, v.dtype, v.device)
    launch_backward(dout, q, k, v, out, lse, delta, dq, dk, dv, key_lengths, causal, scale)
    return dq, dk, dv


@flash_attn_bwd.register_fake
def _(dout, q, k, v, out, lse, key_lengths, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, key_lengths, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_lengths)
    ctx.causal = causal
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, key_lengths = ctx.saved_tensors
    dq, dk, dv = flash_attn_bwd(dout, q, k, v, out, lse, key_lengths, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None


flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    key_lengths: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-2 (Dao 2023): ``softmax(q k^T * scale) v``, differentiable.

    Args:
        q: ``[B, H, Nq, D]``.
        k: ``[B, H_kv, Nk, D]`` with ``H % H_kv == 0``.
        v: ``[B, H_kv, Nk, Dv]``.
        causal: query ``i`` attends keys ``j <= i`` (top-left aligned).
        scale: softmax scale, default ``1 / sqrt(D)``.
        key_lengths: ``[B]`` integer count of valid keys per batch item.
        return_lse: also return the row logsumexp ``[B, H, Nq]`` (float32, natural log,
            ``-inf`` for rows with no admissible key; not differentiable).

    Returns:
        ``[B, H, Nq, Dv]`` in the dtype of ``q`` (and the logsumexp if asked).

    Raises:
        ValueError: for inputs the kernels do not support; the message names the reason.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [B, H, N, D]")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"query heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})"
        )
    reason = unsupported_reason(q, k, v, key_lengths=key_lengths)
    if reason is not None:
        raise ValueError(f"flash_attn_func: {reason}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if key_lengths is not None:
        key_lengths = key_lengths.to(q.device)
    out, lse = flash_attn_fwd(q, k, v, key_lengths, causal, float(scale))
    return (out, lse) if return_lse else out
