"""Triton kernels behind ``core_attention``.

Applications reach these kernels only through ``core_attention``; nothing here is imported
at ``import core_attention`` time, and Triton itself is imported lazily, so CPU-only
machines without Triton can install and use the rest of the stack.
"""

from __future__ import annotations

import os

__all__ = ["available_kernels", "device_unsupported_reason", "interpreter_enabled", "triton_status"]

__version__ = "0.1.0"

# Names of the kernels this package provides; each issue that adds one registers it here.
# "dense_attention": FlashAttention-2 forward/backward (attention_kernels.flash_attention).
_KERNELS: tuple[str, ...] = ("dense_attention",)


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: kernels then run on CPU tensors (slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_unsupported_reason(device) -> str | None:
    """``None`` when kernels can run on ``device`` (a ``torch.device``), else why not.

    Cheap on purpose: it imports neither Triton nor the kernel modules, so a CPU-only
    process asking ``core_attention`` for ``backend="auto"`` never pays for them.
    """
    if device.type == "cpu":
        if interpreter_enabled():
            return None
        return "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)"
    if device.type != "cuda":
        return f"tensors on {device.type} are not supported (CUDA only)"
    return None


# A plain module-level cache rather than functools.lru_cache: torch.compile traces through
# the backend choice, and dynamo warns on (and may break the graph at) lru_cache wrappers.
_TRITON_STATUS: tuple[bool, str] | None = None


def triton_status() -> tuple[bool, str]:
    """Whether Triton imports here, and either its version or the reason it does not."""
    global _TRITON_STATUS
    if _TRITON_STATUS is None:
        try:
            import triton
        except Exception as exc:  # ImportError, or a broken install raising something else
            _TRITON_STATUS = (False, f"triton is not importable ({type(exc).__name__}: {exc})")
        else:
            _TRITON_STATUS = (True, f"triton {triton.__version__}")
    return _TRITON_STATUS


def available_kernels() -> tuple[str, ...]:
    """Names of the kernels this install provides (empty when Triton is unavailable)."""
    ok, _ = triton_status()
    return _KERNELS if ok else ()
