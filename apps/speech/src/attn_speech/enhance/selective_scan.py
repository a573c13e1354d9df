"""The selective scan of Mamba (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with
Selective State Spaces", Algorithm 2 / S6): PyTorch loops and a compiled CPU kernel.

For every channel ``d`` and state ``n``::

    h_t = exp(delta_t * A[d, n]) * h_{t-1} + delta_t * B_t[n] * u_t
    y_t = sum_n C_t[n] * h_t[n] + D[d] * u_t      (then y_t * silu(z_t) when z is given)

:func:`selective_scan` is the entry point; ``backend`` picks an implementation from
:data:`BACKENDS` (``"sequential"``: a step-by-step loop, the reference; ``"chunked"``: chunks
of the sequence scanned in parallel with a Hillis-Steele doubling scan, the state carried
from chunk to chunk; ``"fused"``: the step loop on time-major inputs, the state updated by
one fused multiply-add and read out by one batched matmul; ``"kernel"``: the compiled CPU
loop of :mod:`attn_speech.enhance.scan_kernel`, which keeps a block of the state in
registers for the whole sequence and applies ``D`` and the gate in the same pass, with a
compiled backward that recomputes the states block by block). On CPU the step loops win:
the state stays in cache, whereas every parallel form streams ``[B, D, chunk, N]`` tensors
through memory several times (measured in ``apps/speech/bench/bench_enhance.py``).
``"auto"`` runs ``"kernel"`` where the kernel could be built (with or without gradients),
else ``"fused"``. A GPU kernel registers itself in :data:`BACKENDS` under a new name and
becomes available to every caller.

Shapes: ``u``, ``delta``, ``z`` ``[B, D, L]``; ``A`` ``[D, N]``; ``B``, ``C`` ``[B, N, L]``;
``D`` ``[D]``; ``delta_bias`` ``[D]``; returns ``[B, D, L]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from attn_speech.enhance import scan_kernel

__all__ = [
    "BACKENDS",
    "scan_chunked",
    "scan_fused",
    "scan_kernel_cpu",
    "scan_sequential",
    "selective_scan",
]

ScanFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor
]


def scan_sequential(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> torch.Tensor:
    """``sum_n C_t h_t`` by the recurrence, one step at a time (memory ``O(B D N)``)."""
    b, d, length = u.shape
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(length):
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1))
    return torch.stack(ys, dim=-1)


def scan_fused(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> torch.Tensor:
    """The recurrence one step at a time, arranged for CPU speed.

    Inputs are made time-major and contiguous once, ``delta * u`` is formed once, and each
    step is ``h = addcmul(delta_t u_t B_t, exp(delta_t A), h)`` plus one batched matmul
    ``h @ C_t`` for the output (memory ``O(B D N)`` besides the inputs).
    """
    dt = delta.permute(2, 0, 1).contiguous()  # [L, B, D]
    dtu = (delta * u).permute(2, 0, 1).contiguous()
    bt = B.permute(2, 0, 1).contiguous()[:, :, None, :]  # [L, B, 1, N]
    ct = C.permute(2, 0, 1).contiguous()[..., None]  # [L, B, N, 1]
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = torch.addcmul(dtu[t, :, :, None] * bt[t], torch.exp(dt[t, :, :, None] * A), h)
        ys.append(torch.bmm(h, ct[t]))
    return torch.cat(ys, dim=-1)


def scan_chunked(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk: int = 16,
) -> torch.Tensor:
    """The same recurrence, ``chunk`` steps at a time.

    Inside a chunk the pairs ``(a_t, b_t) = (exp(delta_t A), delta_t B_t u_t)`` are combined
    by the associative operator ``(a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2)`` in
    ``log2(chunk)`` doubling steps; every factor is a decay in ``(0, 1]``, so no
    exponential can overflow. Memory is ``O(B D N chunk)`` whatever the length.
    """
    b, d, length = u.shape
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        dt = delta[:, :, start:stop, None]  # [B, D, K, 1]
        a = torch.exp(dt * A[:, None, :])  # [B, D, K, N]
        x = dt * B[:, None, :, start:stop].transpose(-1, -2) * u[:, :, start:stop, None]
        k = stop - start
        step = 1
        while step < k:
            x = torch.cat([x[:, :, :step], x[:, :, step:] + a[:, :, step:] * x[:, :, :-step]], 2)
            a = torch.cat([a[:, :, :step], a[:, :, step:] * a[:, :, :-step]], 2)
            step *= 2
        hs = x + a * h[:, :, None, :]  # [B, D, K, N]
        ys.append((hs * C[:, None, :, start:stop].transpose(-1, -2)).sum(-1))
        h = hs[:, :, -1]
    return torch.cat(ys, dim=-1)


class _KernelScan(torch.autograd.Function):
    """The compiled loop: :func:`scan_kernel.scan_tokens` forward (scan, ``D u`` and the
    gate in one pass), :func:`scan_kernel.scan_tokens_grad` backward, which recomputes the
    states instead of saving ``[B, D, L, N]`` of them.

    Inputs ``u, delta, A, B, C, D, z`` in :func:`selective_scan`'s layout (``D`` and ``z``
    may be ``None``; ``delta`` positive, bias and softplus applied by the caller).
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z):  # type: ignore[override]
        ctx.save_for_backward(u, delta, A, B, C, D, z)
        y = scan_kernel.scan_tokens(
            u.transpose(1, 2),
            delta.transpose(1, 2),
            A,
            B.transpose(1, 2),
            C.transpose(1, 2),
            D,
            None if z is None else z.transpose(1, 2),
        )
        return y.transpose(1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        u, delta, A, B, C, D, z = ctx.saved_tensors
        grads = scan_kernel.scan_tokens_grad(
            grad.transpose(1, 2),
            *(t.transpose(1, 2) for t in (u, delta)),
            A,
            *(t.transpose(1, 2) for t in (B, C)),
            D,
            None if z is None else z.transpose(1, 2),
        )
        gu, gdelta, gA, gB, gC, gD, gz = (
            None if g is None else g.to(t.dtype) for g, t in zip(grads, ctx.saved_tensors)
        )
        out = (
            gu.transpose(1, 2),
            gdelta.transpose(1, 2),
            gA,
            gB.transpose(1, 2),
            gC.transpose(1, 2),
            gD,
            None if gz is None else gz.transpose(1, 2),
        )
        return tuple(g if need else None for g, need in zip(out, ctx.needs_input_grad))


def scan_kernel_cpu(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> torch.Tensor:
    """The compiled CPU loop (:mod:`attn_speech.enhance.scan_kernel`), differentiable."""
    _check_kernel(u, A.shape[1])
    return _KernelScan.apply(u, delta, A, B, C, None, None)


def _check_kernel(u: torch.Tensor, n: int) -> None:
    if not scan_kernel.supports(u, n):
        raise RuntimeError(
            "the 'kernel' scan needs CPU float32/float64 tensors, N <= 64 and a C++ compiler"
            f" ({scan_kernel.build_error() or 'unsupported inputs'})"
        )


BACKENDS: dict[str, ScanFn] = {
    "sequential": scan_sequential,
    "chunked": scan_chunked,
    "fused": scan_fused,
    "kernel": scan_kernel_cpu,
}


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Mamba's selective scan (the signature of ``mamba_ssm.selective_scan_fn``).

    ``backend``: ``"auto"`` (``"kernel"`` where it is built, else ``"fused"``), or any key
    of :data:`BACKENDS`. With ``"kernel"``, ``D`` and the gate are part of the compiled pass
    and of its backward; ``delta_bias`` and the softplus stay PyTorch ops.
    """
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(
            f"u and delta must both be [B, D, L], got {tuple(u.shape)}, {tuple(delta.shape)}"
        )
    bsz, d, length = u.shape
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be [D={d}, N], got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.shape != (bsz, n, length):
            raise ValueError(f"{name} must be [{bsz}, {n}, {length}], got {tuple(t.shape)}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        backend = "kernel" if scan_kernel.supports(u, n) else "fused"
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    if backend == "kernel":
        # one pass for the scan, D u and the gate, on the token-major layout of Mamba's
        # projections (the transposes inside are views there)
        _check_kernel(u, n)
        return _KernelScan.apply(u, delta, A, B, C, D, z)
    y = BACKENDS[backend](u, delta, A, B, C)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y
