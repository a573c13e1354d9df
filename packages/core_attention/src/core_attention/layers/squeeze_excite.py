"""Squeeze-and-excitation channel attention (Hu et al. 2018, "Squeeze-and-Excitation
Networks", CVPR), for sequences ``[B, C, T]`` and images ``[B, C, H, W]``.

``s = mean(x)`` over time or space, ``g = sigmoid(W_2 act(W_1 s))``, output ``x * g``.
The gates are a sigmoid per channel, not a softmax over tokens, so these modules do not
call :func:`core_attention.attention` and take no ``backend``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from core_attention.layers._lengths import frame_mask, relative_to_frames

__all__ = ["SqueezeExcitation1d", "SqueezeExcitation2d", "make_divisible"]


def pointwise_conv1d(in_channels: int, out_channels: int) -> nn.Sequential:
    """A 1x1 ``Conv1d`` held as ``.conv``: the parameter layout of SpeechBrain's ``Conv1d``."""
    return nn.Sequential(OrderedDict(conv=nn.Conv1d(in_channels, out_channels, kernel_size=1)))


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``v`` to the nearest multiple of ``divisor`` (at least ``min_value``), as timm
    does for SE reduction channels."""
    min_value = min_value or divisor
    return max(min_value, int(v + divisor / 2) // divisor * divisor)


class SqueezeExcitation1d(nn.Module):
    """SE block for sequences, the one of ECAPA-TDNN's SE-Res2Blocks (Desplanques et al. 2020).

    Parameter names and shapes are those of SpeechBrain's
    ``speechbrain.lobes.models.ECAPA_TDNN.SEBlock`` (``conv1.conv.*``, ``conv2.conv.*``), so
    its state dicts load strictly.

    Args:
        in_channels: channels ``C`` of the input.
        se_channels: bottleneck channels.
        out_channels: channels of the gate; must equal ``in_channels`` (kept for the
            SpeechBrain signature), default ``in_channels``.

    Shapes:
        ``forward(x, lengths=None)``: ``x`` ``[B, C, T]``; ``lengths`` ``[B]`` relative
        lengths in ``[0, 1]`` (frame ``t`` is valid when ``t < lengths * T``) so the squeeze
        is a mean over valid frames only; returns ``[B, C, T]``. An item with no valid frame
        is squeezed to zeros (SpeechBrain divides by zero there).
    """

    def __init__(self, in_channels: int, se_channels: int, out_channels: int | None = None):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        if out_channels != in_channels:
            raise ValueError(
                f"out_channels ({out_channels}) must equal in_channels ({in_channels}): "
                "the gate multiplies the input channel by channel"
            )
        self.conv1 = pointwise_conv1d(in_channels, se_channels)
        self.relu = nn.ReLU()
        self.conv2 = pointwise_conv1d(se_channels, out_channels)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"x must be [B, C, T], got shape {tuple(x.shape)}")
        if lengths is None:
            s = x.mean(dim=2, keepdim=True)
        else:
            frames = relative_to_frames(lengths, x.shape[0], x.shape[2], x.device)
            mask = frame_mask(frames, x.shape[2])[:, None, :].to(x.dtype)
            total = frames.clamp(min=1).to(x.dtype)[:, None, None]
            s = (x * mask).sum(dim=2, keepdim=True) / total
        s = self.sigmoid(self.conv2(self.relu(self.conv1(s))))
        return x * s


class SqueezeExcitation2d(nn.Module):
    """SE block for images, as in SE-ResNet and SE-HaloNet.

    Constructor arguments, parameter names and shapes (``fc1``, ``bn``, ``fc2``) follow
    timm's ``timm.layers.SEModule``, so timm state dicts load strictly.

    Args:
        channels: channels ``C``.
        rd_ratio: bottleneck ratio; bottleneck channels are
            ``make_divisible(channels * rd_ratio, rd_divisor)`` unless ``rd_channels``.
        rd_channels: bottleneck channels given directly.
        rd_divisor: rounding divisor of the bottleneck.
        bias: bias in ``fc1`` and ``fc2``.
        act_layer: activation class between the two convolutions.
        norm_layer: optional normalisation class applied to the bottleneck.
        gate_layer: gate class, ``nn.Sigmoid`` in the paper.

    Shapes:
        ``forward(x)``: ``[B, C, H, W]`` -> ``[B, C, H, W]``.
    """

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1.0 / 16,
        rd_channels: int | None = None,
        rd_divisor: int = 8,
        bias: bool = True,
        act_layer: type[nn.Module] = nn.ReLU,
        norm_layer: type[nn.Module] | None = None,
        gate_layer: type[nn.Module] = nn.Sigmoid,
    ) -> None:
        super().__init__()
        if not rd_channels:
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor)
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=bias)
        self.bn = norm_layer(rd_channels) if norm_layer else nn.Identity()
        self.act = act_layer()
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=bias)
        self.gate = gate_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"x must be [B, C, H, W], got shape {tuple(x.shape)}")
        s = x.mean(dim=(2, 3), keepdim=True)
        s = self.fc2(self.act(self.bn(self.fc1(s))))
        return x * self.gate(s)
