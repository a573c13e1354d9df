"""The Mamba block (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective
State Spaces"; the layout and initialisation of ``mamba_ssm.modules.mamba_simple.Mamba``)
and the bidirectional wrapper of SEMamba / MambAttention (Kühne et al. 2025).

Shapes: ``[B, L, C]`` in and out.

Without gradients (inference) and with the compiled kernels of
:mod:`attn_speech.enhance.scan_kernel`, a Mamba layer runs on the token-major layout of its
projections throughout: three GEMMs, one pass for the convolution and SiLU, one pass for
the step size, the scan, the skip term and the gate; the backward direction of
:class:`BiMamba` runs its convolution and scan from the last step instead of flipping.
With gradients (training), the layer is PyTorch ops around :func:`selective_scan`, whose
default backend is then the compiled scan with its compiled backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attn_speech.enhance import scan_kernel
from attn_speech.enhance.selective_scan import selective_scan

__all__ = ["BiMamba", "Mamba", "ResidualMamba"]


class Mamba(nn.Module):
    """in-projection -> causal depthwise conv + SiLU -> selective scan gated by SiLU(z) ->
    out-projection.

    Args:
        d_model: channels ``C``.
        d_state: SSM state size ``N``.
        d_conv: depthwise convolution width.
        expand: inner width ``d_inner = expand * d_model``.
        dt_rank: rank of the step-size projection; default ``ceil(d_model / 16)``.
        dt_min, dt_max: range of the initial step sizes (log-uniform).
        scan_backend: backend of :func:`selective_scan`.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.scan_backend = scan_backend
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(
            torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1)
        )
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(
            torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        with torch.no_grad():  # softplus(bias) = dt
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def _kernel_path(self, x: torch.Tensor) -> bool:
        if self.scan_backend not in ("auto", "kernel"):
            return False
        if torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        ):
            return False
        width = self.conv1d.kernel_size[0]
        return scan_kernel.supports(x, self.d_state, self.dt_rank, width)

    def forward(self, x: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        """``[B, L, C]`` -> ``[B, L, C]``; ``reverse``: run from the last step to the first
        (the layer applied to ``x.flip(1)``, flipped back)."""
        if self._kernel_path(x):
            return self._forward_kernel(x, reverse)
        if reverse:
            return self.forward(x.flip(1)).flip(1)
        length = x.shape[1]
        xz = self.in_proj(x).transpose(1, 2)  # [B, 2 d_inner, L]
        u, z = xz.chunk(2, dim=1)
        u = F.silu(self.conv1d(u)[..., :length])
        dbc = self.x_proj(u.transpose(1, 2))  # [B, L, R + 2N]
        dt, b, c = torch.split(dbc, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ self.dt_proj.weight.t()).transpose(1, 2)
        y = selective_scan(
            u,
            delta,
            -torch.exp(self.A_log.float()),
            b.transpose(1, 2),
            c.transpose(1, 2),
            self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            backend=self.scan_backend,
        )
        return self.out_proj(y.transpose(1, 2))

    def _forward_kernel(self, x: torch.Tensor, reverse: bool) -> torch.Tensor:
        r, n = self.dt_rank, self.d_state
        xz = F.linear(x, self.in_proj.weight)  # [B, L, 2 d_inner]
        u = scan_kernel.conv_silu(
            xz[..., : self.d_inner], self.conv1d.weight[:, 0], self.conv1d.bias, reverse
        )
        dbc = F.linear(u, self.x_proj.weight)  # [B, L, R + 2N]
        y = scan_kernel.scan_tokens(
            u,
            dbc[..., :r],
            -torch.exp(self.A_log.float()),
            dbc[..., r : r + n],
            dbc[..., r + n :],
            self.D.float(),
            z=xz[..., self.d_inner :],
            dt_weight=self.dt_proj.weight,
            dt_bias=self.dt_proj.bias.float(),
            reverse=reverse,
        )
        return F.linear(y, self.out_proj.weight)


class ResidualMamba(nn.Module):
    """``x + Mamba(RMSNorm(x))`` (mamba_ssm's ``Block`` with one layer)."""

    def __init__(self, d_model: int, norm_eps: float = 1e-5, **mamba_kwargs) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.mixer = Mamba(d_model, **mamba_kwargs)

    def forward(self, x: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        return x + self.mixer(self.norm(x), reverse)


class BiMamba(nn.Module):
    """A forward and a backward :class:`ResidualMamba` (own weights), concatenated and
    projected back to ``C`` channels, plus the input (SEMamba's ``MambaBlock`` followed by
    its ``tlinear``/``flinear`` 1x1 transposed convolution).

    Shapes: ``[B, L, C]`` -> ``[B, L, C]``.
    """

    tile_tokens = 2048  # inference on the compiled kernels: sequences per tile ~ this / L

    def __init__(self, d_model: int, **mamba_kwargs) -> None:
        super().__init__()
        self.forward_mamba = ResidualMamba(d_model, **mamba_kwargs)
        self.backward_mamba = ResidualMamba(d_model, **mamba_kwargs)
        self.proj = nn.ConvTranspose1d(2 * d_model, d_model, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.forward_mamba.mixer._kernel_path(x):
            return self._forward_tile(x)
        # Without autograd, sequences go through in tiles of about `tile_tokens` tokens:
        # the [tile, L, 2 d_inner] intermediates then stay in cache, and freed tiles are
        # reused by the allocator instead of being mapped afresh (page faults) each time.
        out = torch.empty_like(x)
        step = max(1, self.tile_tokens // max(1, x.shape[1]))
        for start in range(0, x.shape[0], step):
            out[start : start + step] = self._forward_tile(x[start : start + step])
        return out

    def _forward_tile(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        w = self.proj.weight[:, :, 0]  # [2C, C]: the 1x1 transposed convolution as a GEMM
        y = F.linear(self.forward_mamba(x), w[:c].t(), self.proj.bias)
        return x + y + F.linear(self.backward_mamba(x, reverse=True), w[c:].t())
