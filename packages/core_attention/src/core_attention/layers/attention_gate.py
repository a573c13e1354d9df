"""Additive attention gate of Attention U-Net (Oktay et al. 2018, "Attention U-Net: Learning
Where to Look for the Pancreas", MIDL), for 2D images and 3D volumes.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AttentionGate"]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_LINEAR_MODE = {2: "bilinear", 3: "trilinear"}


class AttentionGate(nn.Module):
    """Gate skip features ``x`` with a coarser gating signal ``g``.

    ``q = relu(W_g g + W_x x)``, ``alpha = sigmoid(psi(q))``, output ``x * alpha``:

    * ``W_x`` is a convolution with kernel and stride ``sub_sample`` (1x1 by default, as
      MONAI; the paper's ``theta_x`` uses 2), so ``W_x x`` lies on a grid
      ``floor(S / sub_sample)``;
    * ``W_g g`` is a 1x1 convolution of the gating signal, resampled (bi/trilinear,
      ``align_corners=False``) to the grid of ``W_x x`` when their sizes differ, so ``g`` may
      come from a coarser level and sizes may be odd;
    * ``psi`` is a 1x1 convolution to one channel; ``alpha`` is resampled to the size of
      ``x`` when ``sub_sample > 1``.

    With ``norm=True`` each convolution is followed by batch norm, which is MONAI's
    ``monai.networks.nets.attentionunet.AttentionBlock``; parameter names and shapes
    (``W_g.0.conv.*``, ``W_g.1.*``, ``W_x.*``, ``psi.*``) are MONAI's, so its state dicts load
    strictly and, at ``sub_sample=1`` with ``g`` and ``x`` of one size, the outputs agree.
    MONAI's block has no resampling (its ``AttentionLayer`` upsamples ``g`` with a learned
    transposed convolution first) and ignores its ``dropout`` argument, so neither is here.
    ``norm=False`` is the paper's gate (no normalisation inside it); the paper's output
    transform after gating (1x1 conv + batch norm) belongs to the network, not to the gate.

    The gate is a per-position sigmoid, not a softmax over keys, so this module does not call
    :func:`core_attention.attention` and takes no ``backend``.

    Args:
        spatial_dims: 2 (images) or 3 (volumes).
        f_int: intermediate channels.
        f_g: channels of the gating signal ``g``.
        f_l: channels of the gated features ``x``.
        sub_sample: kernel and stride of ``W_x``.
        norm: batch norm after ``W_g``, ``W_x`` and ``psi``.

    Shapes:
        ``forward(g, x, return_attention=False)``: ``g`` ``[B, f_g, *S_g]``, ``x``
        ``[B, f_l, *S]`` (``S`` of length ``spatial_dims``); returns ``[B, f_l, *S]``, or
        ``(out, alpha)`` with ``alpha`` ``[B, 1, *S]`` when ``return_attention``.
    """

    def __init__(
        self,
        spatial_dims: int,
        f_int: int,
        f_g: int,
        f_l: int,
        *,
        sub_sample: int = 1,
        norm: bool = True,
    ) -> None:
        super().__init__()
        if spatial_dims not in _CONV:
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if sub_sample < 1:
            raise ValueError(f"sub_sample must be >= 1, got {sub_sample}")
        self.spatial_dims = spatial_dims
        self.sub_sample = sub_sample
        self.W_g = self._branch(f_g, f_int, 1, norm)
        self.W_x = self._branch(f_l, f_int, sub_sample, norm)
        self.psi = self._branch(f_int, 1, 1, norm)
        self.psi.append(nn.Sigmoid())
        self.relu = nn.ReLU()

    def _branch(self, cin: int, cout: int, kernel: int, norm: bool) -> nn.Sequential:
        conv = _CONV[self.spatial_dims](cin, cout, kernel_size=kernel, stride=kernel)
        layers: list[nn.Module] = [nn.Sequential(OrderedDict(conv=conv))]
        if norm:
            layers.append(_NORM[self.spatial_dims](cout))
        return nn.Sequential(*layers)

    def _resample(self, t: torch.Tensor, size) -> torch.Tensor:
        if t.shape[2:] == size:
            return t
        return F.interpolate(
            t, size=size, mode=_LINEAR_MODE[self.spatial_dims], align_corners=False
        )

    def forward(
        self, g: torch.Tensor, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        n = self.spatial_dims + 2
        if g.dim() != n or x.dim() != n:
            raise ValueError(
                f"spatial_dims={self.spatial_dims} needs {n}-D g and x, got "
                f"{tuple(g.shape)} and {tuple(x.shape)}"
            )
        if g.shape[0] != x.shape[0]:
            raise ValueError(f"batch sizes differ: g {g.shape[0]}, x {x.shape[0]}")
        x1 = self.W_x(x)
        g1 = self._resample(self.W_g(g), x1.shape[2:])
        alpha = self._resample(self.psi(self.relu(g1 + x1)), x.shape[2:])
        out = x * alpha
        return (out, alpha) if return_attention else out
