"""The MambAttention network (Kühne et al. 2025, "MambAttention: Mamba with Multi-Head
Attention for Generalizable Single-Channel Speech Enhancement", arXiv:2507.00966).

MP-SENet's (Lu et al. 2023) dense encoder and magnitude-mask / wrapped-phase decoders around
time-frequency blocks; each block is ``X + MHA(LN(X))`` along time, bidirectional Mamba
(Gu & Dao 2023) along time, the same attention module along frequency, bidirectional Mamba
along frequency (:class:`core_attention.layers.TimeFrequencyAttention` holds the shared
attention). At the defaults the network has about 2.33M parameters.

Feature maps are ``[B, C, T, F']`` inside (``F' = (F - 1) // 2`` after the encoder's
frequency-halving convolution).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attn_speech.enhance import norm_kernel
from attn_speech.enhance.mamba import BiMamba
from attn_speech.enhance.stft import StftConfig, mag_pha_istft, mag_pha_stft
from attn_training.pretrained import PretrainedMixin
from core_attention.layers.time_frequency import TimeFrequencyAttention

__all__ = ["DenseBlock", "MambAttention", "TFBlock"]


def _norm_act(channels: int) -> list[nn.Module]:
    return [nn.InstanceNorm2d(channels, affine=True), nn.PReLU(channels)]


class ConvNormAct(nn.Sequential):
    """A convolution, ``InstanceNorm2d`` and ``PReLU`` (the parameter names of the plain
    ``nn.Sequential``). Without autograd the last two run as one compiled pass
    (:mod:`attn_speech.enhance.norm_kernel`) that can write into a given ``out``.
    """

    def __init__(self, conv: nn.Module, channels: int) -> None:
        super().__init__(conv, *_norm_act(channels))

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        y = self[0](x)
        if norm_kernel.supports(y, self[1], self[2]):
            return norm_kernel.instance_norm_prelu(y, self[1], self[2], out=out)
        y = self[2](self[1](y))
        return y if out is None else out.copy_(y)


class DenseBlock(nn.Module):
    """``depth`` 3x3 convolutions, dilated ``2^i`` along time, each fed the concatenation of
    the block input and every earlier output (MP-SENet). ``[B, C, T, F]`` in and out."""

    def __init__(self, channels: int, depth: int = 4, kernel: tuple[int, int] = (3, 3)) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for i in range(depth):
            dil = 2**i
            pad = (dil * (kernel[0] - 1) // 2, (kernel[1] - 1) // 2)
            self.layers.append(
                ConvNormAct(
                    nn.Conv2d(channels * (i + 1), channels, kernel, dilation=(dil, 1), padding=pad),
                    channels,
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            skip = x
            for layer in self.layers[:-1]:
                skip = torch.cat([layer(skip), skip], dim=1)
            return self.layers[-1](skip)
        # Inference: one buffer holds [x_{depth-1}, ..., x_1, input], filled from the end,
        # so that layer i reads its input as a view instead of a fresh concatenation.
        # (Autograd would reject writing into a buffer an earlier layer saved.)
        c, depth = x.shape[1], len(self.layers)
        buf = x.new_empty(x.shape[0], depth * c, *x.shape[2:])
        buf[:, (depth - 1) * c :] = x
        for i, layer in enumerate(self.layers[:-1]):
            layer(
                buf[:, (depth - 1 - i) * c :], out=buf[:, (depth - 2 - i) * c : (depth - 1 - i) * c]
            )
        return self.layers[-1](buf)


class DenseEncoder(nn.Module):
    """``[B, 2, T, F]`` (compressed magnitude, phase) -> ``[B, C, T, (F - 1) // 2]``."""

    def __init__(self, channels: int, in_channels: int = 2) -> None:
        super().__init__()
        self.conv_in = ConvNormAct(nn.Conv2d(in_channels, channels, 1), channels)
        self.dense = DenseBlock(channels)
        self.conv_out = ConvNormAct(nn.Conv2d(channels, channels, (1, 3), (1, 2)), channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.dense(self.conv_in(x)))


class LearnableSigmoid(nn.Module):
    """``beta * sigmoid(slope_f * x)`` with one learnable slope per frequency bin."""

    def __init__(self, bins: int, beta: float = 2.0) -> None:
        super().__init__()
        self.beta = beta
        self.slope = nn.Parameter(torch.ones(bins))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., F]
        return self.beta * torch.sigmoid(self.slope * x)


class MaskDecoder(nn.Module):
    """``[B, C, T, F']`` -> magnitude mask ``[B, T, F]`` in ``(0, beta)``."""

    def __init__(self, channels: int, bins: int, beta: float = 2.0) -> None:
        super().__init__()
        self.dense = DenseBlock(channels)
        self.conv = nn.Sequential(
            nn.ConvTranspose2d(channels, channels, (1, 3), (1, 2)),
            nn.Conv2d(channels, 1, 1),
            *_norm_act(1),
            nn.Conv2d(1, 1, 1),
        )
        self.act = LearnableSigmoid(bins, beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dense(x)
        if torch.is_grad_enabled():
            return self.act(self.conv(x)[:, 0])
        # Inference: the 1x1 convolution to one channel after the transposed convolution is
        # folded into it (both are linear per position), one output channel instead of C.
        up, proj = self.conv[0], self.conv[1]
        w_proj = proj.weight[:, :, 0, 0]  # [1, C]
        weight = torch.einsum("iokw,po->ipkw", up.weight, w_proj)
        bias = w_proj @ up.bias + proj.bias
        y = F.conv_transpose2d(x, weight, bias, stride=up.stride, padding=up.padding)
        return self.act(self.conv[2:](y)[:, 0])


class PhaseDecoder(nn.Module):
    """``[B, C, T, F']`` -> wrapped phase ``[B, T, F]`` as ``atan2`` of two predicted maps
    (a pseudo real and imaginary part)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dense = DenseBlock(channels)
        self.conv = ConvNormAct(nn.ConvTranspose2d(channels, channels, (1, 3), (1, 2)), channels)
        self.real = nn.Conv2d(channels, 1, 1)
        self.imag = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.dense(x))
        return torch.atan2(self.imag(x)[:, 0], self.real(x)[:, 0])


class TFBlock(nn.Module):
    """Shared attention + bi-Mamba along time, then along frequency. ``[B, C, T, F]``."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        d_state: int,
        d_conv: int,
        expand: int,
        attn_backend: str = "auto",
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        mamba = {
            "d_state": d_state,
            "d_conv": d_conv,
            "expand": expand,
            "scan_backend": scan_backend,
        }
        self.attn = TimeFrequencyAttention(channels, num_heads, backend=attn_backend)
        self.time_mamba = BiMamba(channels, **mamba)
        self.freq_mamba = BiMamba(channels, **mamba)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, f = x.shape
        x = self.attn(x, "time")
        seq = x.permute(0, 3, 2, 1).reshape(b * f, t, c)
        x = self.time_mamba(seq).view(b, f, t, c).permute(0, 3, 2, 1)
        x = self.attn(x, "freq")
        seq = x.permute(0, 2, 3, 1).reshape(b * t, f, c)
        return self.freq_mamba(seq).view(b, t, f, c).permute(0, 3, 1, 2)


class MambAttention(PretrainedMixin, nn.Module):
    """The full network; ``config.json`` holds these arguments.

    Args:
        n_fft, hop, win, compress: the STFT (:class:`StftConfig`); 16 kHz audio.
        channels: width of the dense encoder, the blocks and the decoders.
        num_blocks: time-frequency blocks.
        num_heads: attention heads.
        d_state, d_conv, expand: Mamba sizes.
        beta: upper bound of the magnitude mask.

    ``forward(mag, pha)``: compressed magnitude and phase ``[B, F, T]`` -> enhanced
    ``(mag, pha, com)`` with ``com`` ``[B, F, T, 2]``. :meth:`enhance` goes from waveform
    ``[B, samples]`` to waveform.
    """

    sample_rate = 16000

    def __init__(
        self,
        n_fft: int = 400,
        hop: int = 100,
        win: int = 400,
        compress: float = 0.3,
        channels: int = 64,
        num_blocks: int = 4,
        num_heads: int = 8,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 4,
        beta: float = 2.0,
        attn_backend: str = "auto",
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.stft = StftConfig(n_fft, hop, win, compress)
        self.encoder = DenseEncoder(channels)
        self.blocks = nn.ModuleList(
            TFBlock(channels, num_heads, d_state, d_conv, expand, attn_backend, scan_backend)
            for _ in range(num_blocks)
        )
        self.mask_decoder = MaskDecoder(channels, self.stft.bins, beta)
        self.phase_decoder = PhaseDecoder(channels)

    def forward(
        self, mag: torch.Tensor, pha: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if mag.dim() != 3 or mag.shape != pha.shape or mag.shape[1] != self.stft.bins:
            raise ValueError(
                f"mag and pha must both be [B, {self.stft.bins}, T], got "
                f"{tuple(mag.shape)} and {tuple(pha.shape)}"
            )
        mag_tf = mag.transpose(1, 2)  # [B, T, F]
        x = self.encoder(torch.stack([mag_tf, pha.transpose(1, 2)], dim=1))
        for block in self.blocks:
            x = block(x)
        out_mag = (mag_tf * self.mask_decoder(x)).transpose(1, 2)
        out_pha = self.phase_decoder(x).transpose(1, 2)
        com = torch.stack((out_mag * torch.cos(out_pha), out_mag * torch.sin(out_pha)), dim=-1)
        return out_mag, out_pha, com

    def enhance(self, wav: torch.Tensor) -> torch.Tensor:
        """Enhanced waveform ``[B, samples]`` of 16 kHz ``wav`` ``[B, samples]``.

        Each signal is scaled to unit RMS on the way in and back on the way out (MP-SENet's
        ``norm_factor``), so the network sees the level it was trained at.
        """
        if wav.dim() != 2:
            raise ValueError(f"wav must be [B, samples], got {tuple(wav.shape)}")
        rms = wav.square().mean(dim=1, keepdim=True).sqrt().clamp_min(1e-8)
        mag, pha, _ = mag_pha_stft(wav / rms, self.stft)
        out_mag, out_pha, _ = self(mag, pha)
        return mag_pha_istft(out_mag, out_pha, self.stft, length=wav.shape[1]) * rms
