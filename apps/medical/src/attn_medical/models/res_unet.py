"""Residual U-Net with additive attention gates on the skip connections, 2D and 3D.

The network of Chae et al. 2021 ("A Pressure Ulcer Care System For Remote Medical
Assistance: Residual U-Net with an Attention Model Based for Wound Area Segmentation",
arXiv 2101.09433): a U-Net whose encoder and decoder stages are residual units, and whose
skip connections pass through the attention gate of Oktay et al. 2018 ("Attention U-Net:
Learning Where to Look for the Pancreas", :class:`core_attention.layers.attention_gate.
AttentionGate`) before they are concatenated with the up-sampled decoder features.

Each gate is driven by the coarser decoder features (the gating signal ``g`` of level
``l + 1``, before up-sampling) and gates the encoder features of level ``l``; the gate
resamples ``W_g g`` to the skip's grid, so any stride (also anisotropic) works.

Shapes: ``[B, in_channels, *S]`` -> ``[B, out_channels, *S]`` logits for any ``S``; inputs
are zero-padded at the end of each axis to a multiple of :attr:`size_divisor` and the
output is cropped back. In training mode with ``deep_supervision`` the forward returns a
list ``[main, aux_1, ...]`` where ``aux_k`` has the spatial size ``ceil(S / s_k)``, with
``s_k`` the product of the first ``k`` strides (``S / 2**k`` with the default strides), as
nnU-Net's deep supervision.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from attn_medical.models.blocks import (
    ResidualBlock,
    conv_nd,
    conv_transpose_nd,
    crop_to,
    pad_to_multiple,
)
from attn_medical.models.config import AttentionResUNetConfig
from core_attention.layers.attention_gate import AttentionGate


class EncoderStage(nn.Sequential):
    """``blocks_per_level`` residual units; the first one carries the level's stride."""

    def __init__(self, cfg: AttentionResUNetConfig, cin: int, cout: int, stride) -> None:
        blocks = [
            ResidualBlock(cfg.spatial_dims, cin, cout, stride, cfg.norm, cfg.act, cfg.dropout)
        ]
        for _ in range(cfg.blocks_per_level - 1):
            blocks.append(
                ResidualBlock(cfg.spatial_dims, cout, cout, 1, cfg.norm, cfg.act, cfg.dropout)
            )
        super().__init__(*blocks)


class DecoderStage(nn.Module):
    """Up-sample level ``l + 1``, gate the level-``l`` skip with it, fuse with a residual unit.

    ``forward(coarse [B, C_{l+1}, *S_{l+1}], skip [B, C_l, *S_l])`` returns
    ``(fused [B, C_l, *S_l], alpha [B, 1, *S_l])``.
    """

    def __init__(self, cfg: AttentionResUNetConfig, level: int) -> None:
        super().__init__()
        c_skip, c_coarse = cfg.channels[level], cfg.channels[level + 1]
        stride = cfg.stride_per_axis(level)
        self.up = conv_transpose_nd(cfg.spatial_dims)(
            c_coarse, c_skip, kernel_size=stride, stride=stride
        )
        # The gate's own normalisation is batch norm; with other network norms the gate is
        # the paper's un-normalised one (batch statistics would tie the gate to batch size).
        self.gate = AttentionGate(
            cfg.spatial_dims,
            f_int=max(1, c_skip // 2),
            f_g=c_coarse,
            f_l=c_skip,
            norm=cfg.norm == "batch",
        )
        self.fuse = ResidualBlock(
            cfg.spatial_dims, 2 * c_skip, c_skip, 1, cfg.norm, cfg.act, cfg.dropout
        )

    def forward(self, coarse: torch.Tensor, skip: torch.Tensor):
        gated, alpha = self.gate(coarse, skip, return_attention=True)
        up = crop_to(self.up(coarse), skip.shape[2:])
        return self.fuse(torch.cat([gated, up], dim=1)), alpha


class AttentionResUNet(nn.Module):
    """Attention residual U-Net (Chae et al. 2021, arXiv 2101.09433; Oktay et al. 2018).

    Build from an :class:`AttentionResUNetConfig` (or its keyword arguments); save and
    load with :meth:`save_pretrained` / :meth:`from_pretrained` (``model.safetensors`` +
    ``config.json``).
    """

    def __init__(self, config: AttentionResUNetConfig | None = None, **kwargs) -> None:
        super().__init__()
        if config is None:
            config = AttentionResUNetConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a config or keyword arguments, not both")
        self.config = cfg = config
        levels = len(cfg.channels)
        self.encoders = nn.ModuleList(
            [EncoderStage(cfg, cfg.in_channels, cfg.channels[0], 1)]
            + [
                EncoderStage(cfg, cfg.channels[i - 1], cfg.channels[i], cfg.stride_per_axis(i - 1))
                for i in range(1, levels)
            ]
        )
        self.decoders = nn.ModuleList([DecoderStage(cfg, i) for i in range(levels - 1)])
        conv = conv_nd(cfg.spatial_dims)
        self.head = conv(cfg.channels[0], cfg.out_channels, 1)
        n_aux = cfg.deep_supervision_levels if cfg.deep_supervision else 0
        self.aux_heads = nn.ModuleList(
            [conv(cfg.channels[k], cfg.out_channels, 1) for k in range(1, 1 + n_aux)]
        )

    @property
    def size_divisor(self) -> tuple[int, ...]:
        return self.config.size_divisor

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        """Logits ``[B, out_channels, *S]`` for ``x`` ``[B, in_channels, *S]``.

        In training mode with deep supervision: the list ``[main, aux_1, ...]``. With
        ``return_attention``: also the gates' coefficients, finest level first, each
        ``[B, 1, *S_l]`` cropped to the input's extent at that level.
        """
        cfg = self.config
        if x.dim() != cfg.spatial_dims + 2:
            raise ValueError(
                f"expected a {cfg.spatial_dims + 2}-D input [B, C, *S], got shape {tuple(x.shape)}"
            )
        if x.shape[1] != cfg.in_channels:
            raise ValueError(f"expected {cfg.in_channels} input channels, got {x.shape[1]}")
        x, size = pad_to_multiple(x, cfg.size_divisor)
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
        decoded: dict[int, torch.Tensor] = {}
        alphas: dict[int, torch.Tensor] = {}
        for level in reversed(range(len(self.decoders))):
            x, alphas[level] = self.decoders[level](x, skips[level])
            decoded[level] = x
        main = crop_to(self.head(x), size)

        def level_size(level: int) -> list[int]:
            stride = cfg.cumulative_stride(level)
            return [math.ceil(s / c) for s, c in zip(size, stride)]

        out: torch.Tensor | list[torch.Tensor] = main
        if self.training and len(self.aux_heads):
            out = [main] + [
                crop_to(head(decoded[k + 1]), level_size(k + 1))
                for k, head in enumerate(self.aux_heads)
            ]
        if return_attention:
            maps = [crop_to(alphas[level], level_size(level)) for level in sorted(alphas)]
            return out, maps
        return out

    def save_pretrained(self, directory: str | Path, overwrite: bool = False) -> Path:
        from attn_medical.models.pretrained import save_pretrained

        return save_pretrained(self, directory, overwrite=overwrite)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, map_location: str | torch.device = "cpu"
    ) -> AttentionResUNet:
        from attn_medical.models.pretrained import load_pretrained

        return load_pretrained(directory, map_location=map_location)
