"""The building blocks of ECAPA-TDNN (Desplanques et al. 2020), with SpeechBrain's names.

Parameter names and shapes are those of ``speechbrain.lobes.models.ECAPA_TDNN``
(``conv.conv.weight``, ``norm.norm.running_mean``, ...), so SpeechBrain state dicts load
strictly. Tensors are channels-first, ``[B, C, T]``, as inside SpeechBrain's model.

Convolutions pad "same" by reflection, like SpeechBrain's ``Conv1d``. In a padded batch each
item is reflected at its own last valid frame (``frames``), so the valid outputs of an item
equal the ones it gets alone: an embedding never depends on its batch-mates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core_attention.layers.squeeze_excite import SqueezeExcitation1d


def make_activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU()
    raise ValueError(f"unsupported activation {name!r}")


def reflect_index(frames: torch.Tensor, max_len: int, pad: int) -> torch.Tensor:
    """Source index ``[B, max_len + 2 * pad]`` of a per-item reflection padding.

    Output position ``u`` reads input frame ``t = u - pad``: ``-t`` before the start,
    ``t`` inside, ``2 (frames - 1) - t`` past the item's last valid frame (clamped into
    the tensor; those positions feed only outputs past the item's end).
    """
    t = torch.arange(-pad, max_len + pad, device=frames.device)[None, :]
    last = (frames[:, None] - 1).clamp(min=0)
    src = torch.where(t < 0, -t, t)
    src = torch.where(src > last, 2 * last - src, src)
    return src.clamp(0, max_len - 1)


class Conv1d(nn.Module):
    """1-D convolution with SpeechBrain's "same" reflection padding, weights at ``.conv``.

    Shapes: ``[B, C_in, T]`` -> ``[B, C_out, T]``; ``frames`` ``[B]`` (valid frames per
    item) or ``None`` when every item fills the tensor.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"'same' padding needs an odd kernel size, got {kernel_size}")
        self.pad = dilation * (kernel_size - 1) // 2
        self.conv = nn.Conv1d(
            in_channels, out_channels, kernel_size, dilation=dilation, groups=groups, bias=bias
        )

    def forward(self, x: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        if self.pad:
            if frames is None:
                x = F.pad(x, (self.pad, self.pad), mode="reflect")
            else:
                index = reflect_index(frames.to(x.device), x.shape[-1], self.pad)
                x = torch.gather(x, 2, index[:, None, :].expand(-1, x.shape[1], -1))
        return self.conv(x)


class BatchNorm1d(nn.Module):
    """``nn.BatchNorm1d`` held at ``.norm`` (SpeechBrain's wrapper), on ``[B, C, T]``."""

    def __init__(self, input_size: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(input_size, eps=eps, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class TDNNBlock(nn.Module):
    """Conv1d -> activation -> BatchNorm -> channel dropout (a TDNN layer)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        dilation: int,
        activation: str = "relu",
        groups: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv = Conv1d(in_channels, out_channels, kernel_size, dilation, groups)
        self.activation = make_activation(activation)
        self.norm = BatchNorm1d(out_channels)
        self.dropout = nn.Dropout1d(p=dropout)

    def forward(self, x: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        return self.dropout(self.norm(self.activation(self.conv(x, frames))))


class Res2NetBlock(nn.Module):
    """Res2Net with dilation: ``scale`` channel groups, each group's TDNN sees the previous.

    Group 0 passes through; group 1 goes through ``blocks[0]``; group ``i > 1`` through
    ``blocks[i-1]`` after adding group ``i-1``'s output (hierarchical residual, Gao et al.
    2019), which widens the receptive field inside one block.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        scale: int = 8,
        kernel_size: int = 3,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        if in_channels % scale or out_channels % scale:
            raise ValueError(f"channels {in_channels}/{out_channels} not divisible by {scale}")
        self.scale = scale
        self.blocks = nn.ModuleList(
            TDNNBlock(in_channels // scale, out_channels // scale, kernel_size, dilation)
            for _ in range(scale - 1)
        )

    def forward(self, x: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        outputs = []
        y = None
        for i, x_i in enumerate(torch.chunk(x, self.scale, dim=1)):
            if i == 0:
                y = x_i
            elif i == 1:
                y = self.blocks[0](x_i, frames)
            else:
                y = self.blocks[i - 1](x_i + y, frames)
            outputs.append(y)
        return torch.cat(outputs, dim=1)


class SERes2NetBlock(nn.Module):
    """SE-Res2Block: TDNN (1x1) -> Res2Net (dilated) -> TDNN (1x1) -> SE, plus a residual.

    The squeeze-excitation is :class:`core_attention.layers.SqueezeExcitation1d`
    (``se_block.conv1.conv.*``, ``se_block.conv2.conv.*``); its mean runs over valid frames.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        res2net_scale: int = 8,
        se_channels: int = 128,
        kernel_size: int = 1,
        dilation: int = 1,
        activation: str = "relu",
        groups: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.tdnn1 = TDNNBlock(in_channels, out_channels, 1, 1, activation, groups, dropout)
        self.res2net_block = Res2NetBlock(
            out_channels, out_channels, res2net_scale, kernel_size, dilation
        )
        self.tdnn2 = TDNNBlock(out_channels, out_channels, 1, 1, activation, groups, dropout)
        self.se_block = SqueezeExcitation1d(out_channels, se_channels, out_channels)
        self.shortcut = (
            Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor | None = None,
        frames: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = x if self.shortcut is None else self.shortcut(x)
        x = self.tdnn1(x)
        x = self.res2net_block(x, frames)
        x = self.tdnn2(x)
        x = self.se_block(x, lengths)
        return x + residual
