"""Backend choice for every attention entry point: ``"auto" | "torch" | "triton"``.

``auto`` runs a Triton kernel when the inputs are on CUDA (or on CPU with
``TRITON_INTERPRET=1``) and the kernel supports the case, and the PyTorch path otherwise;
within the PyTorch path, CPU inference with heads of at most 16 channels and no mask but key
lengths runs the compiled kernel of :mod:`core_attention.cpu_attention`.
``triton`` insists on the kernel and raises :class:`BackendUnavailableError` naming what is
missing. The environment variable ``CORE_ATTENTION_BACKEND`` replaces ``auto`` (an explicit
``"torch"`` or ``"triton"`` in code stays as written).
"""

from __future__ import annotations

import os
from typing import Literal

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")
ENV_VAR = "CORE_ATTENTION_BACKEND"


class BackendUnavailableError(RuntimeError):
    """``backend="triton"`` was asked for a case no Triton kernel supports."""


def requested_backend(backend: str) -> str:
    """Validate ``backend`` and apply the ``CORE_ATTENTION_BACKEND`` override to ``auto``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env:
            if env not in BACKENDS:
                raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {env!r}")
            return env
    return backend


def resolve(backend: str, why_not_triton: str | None) -> str:
    """Pick ``"torch"`` or ``"triton"``.

    ``why_not_triton`` is ``None`` when a Triton kernel can run this call, else a sentence
    saying why not (it becomes the error message when ``backend="triton"``).
    """
    backend = requested_backend(backend)
    if backend == "torch":
        return "torch"
    if why_not_triton is None:
        return "triton"
    if backend == "triton":
        raise BackendUnavailableError(f"backend='triton' cannot run this call: {why_not_triton}")
    return "torch"
