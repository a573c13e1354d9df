"""Building blocks of the attention residual U-Net: normalisation, residual unit, resizing.

The residual unit is the pre-addition form of He et al. 2016 used by residual U-Nets
(Zhang et al. 2018; Chae et al. 2021, arXiv 2101.09433): two 3x3(x3) convolutions with
normalisation and activation, added to a projected shortcut.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("batch", "instance", "group", "none")
ACTIVATIONS = ("leakyrelu", "relu")

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def conv_nd(spatial_dims: int) -> type[nn.Module]:
    return _CONV[spatial_dims]


def conv_transpose_nd(spatial_dims: int) -> type[nn.Module]:
    return _CONV_T[spatial_dims]


def make_norm(norm: str, spatial_dims: int, channels: int) -> nn.Module:
    """``batch`` / ``instance`` (affine, as nnU-Net) / ``group`` (up to 8 groups) / ``none``."""
    if norm == "batch":
        return (nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d)(channels)
    if norm == "instance":
        cls = nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d
        return cls(channels, affine=True)
    if norm == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def make_act(act: str) -> nn.Module:
    if act == "leakyrelu":
        return nn.LeakyReLU(0.01, inplace=True)
    if act == "relu":
        return nn.ReLU(inplace=True)
    raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")


class ResidualBlock(nn.Module):
    """``act(norm(conv(act(norm(conv_s(x))))) + shortcut(x))``.

    The first convolution carries the stride (down-sampling inside the block, as ResNet);
    the shortcut is the identity when shape and channels are unchanged, else a strided
    1x1 convolution with normalisation.

    Shapes: ``[B, in_channels, *S]`` -> ``[B, out_channels, *ceil(S / stride)]``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        stride: int | Sequence[int] = 1,
        norm: str = "instance",
        act: str = "leakyrelu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        conv = conv_nd(spatial_dims)
        stride = tuple(stride) if isinstance(stride, Sequence) else (stride,) * spatial_dims
        self.conv1 = conv(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = make_norm(norm, spatial_dims, out_channels)
        self.act1 = make_act(act)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = make_norm(norm, spatial_dims, out_channels)
        self.act2 = make_act(act)
        if in_channels != out_channels or any(s != 1 for s in stride):
            self.shortcut = nn.Sequential(
                conv(in_channels, out_channels, 1, stride=stride, bias=False),
                make_norm(norm, spatial_dims, out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(self.act1(self.norm1(self.conv1(x))))
        y = self.norm2(self.conv2(y))
        return self.act2(y + self.shortcut(x))


def pad_to_multiple(x: torch.Tensor, multiple: Sequence[int]) -> tuple[torch.Tensor, tuple]:
    """Zero-pad the spatial axes of ``[B, C, *S]`` at their ends to multiples of ``multiple``.

    Returns the padded tensor and the original spatial size (for :func:`crop_to`).
    """
    size = tuple(x.shape[2:])
    extra = [(-s) % m for s, m in zip(size, multiple)]
    if not any(extra):
        return x, size
    pad: list[int] = []
    for e in reversed(extra):  # F.pad lists the last axis first
        pad += [0, e]
    return F.pad(x, pad), size


def crop_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The leading ``size`` of every spatial axis of ``[B, C, *S]``."""
    return x[(slice(None), slice(None), *(slice(0, s) for s in size))]
