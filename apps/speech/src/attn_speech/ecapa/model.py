"""ECAPA-TDNN speaker embeddings (Desplanques et al. 2020, "ECAPA-TDNN: Emphasized Channel
Attention, Propagation and Aggregation in TDNN Based Speaker Verification", Interspeech)
and SpeechBrain's cosine classifier head, with SpeechBrain's parameter names and shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attn_speech.ecapa.config import ClassifierConfig, EcapaConfig
from attn_speech.ecapa.layers import BatchNorm1d, Conv1d, SERes2NetBlock, TDNNBlock
from attn_speech.ecapa.lengths import frames_from_relative
from core_attention.layers.attentive_pooling import AttentiveStatisticsPooling


class EcapaTDNN(nn.Module):
    """ECAPA-TDNN: TDNN, SE-Res2Blocks (dilations 2, 3, 4), multi-layer feature aggregation,
    attentive statistics pooling with global context, and a linear embedding layer.

    The state dict is the one of ``speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN`` built with
    the same arguments (``blocks.*``, ``mfa.*``, ``asp.*``, ``asp_bn.*``, ``fc.*``).

    Shapes:
        ``forward(x, lengths=None)``: ``x`` ``[B, T, input_size]`` features; ``lengths``
        ``[B]`` relative lengths (frame ``t`` is valid when ``t < lengths * T``); returns
        ``[B, 1, lin_neurons]`` like SpeechBrain. Valid outputs depend only on valid frames.
    """

    def __init__(self, config: EcapaConfig | None = None) -> None:
        super().__init__()
        cfg = config or EcapaConfig()
        self.config = cfg
        ch, ks, dil, gr = cfg.channels, cfg.kernel_sizes, cfg.dilations, cfg.groups
        self.channels = list(ch)
        self.blocks = nn.ModuleList(
            [TDNNBlock(cfg.input_size, ch[0], ks[0], dil[0], cfg.activation, gr[0], cfg.dropout)]
        )
        for i in range(1, len(ch) - 1):
            self.blocks.append(
                SERes2NetBlock(
                    ch[i - 1],
                    ch[i],
                    res2net_scale=cfg.res2net_scale,
                    se_channels=cfg.se_channels,
                    kernel_size=ks[i],
                    dilation=dil[i],
                    activation=cfg.activation,
                    groups=gr[i],
                    dropout=cfg.dropout,
                )
            )
        self.mfa = TDNNBlock(
            ch[-2] * (len(ch) - 2), ch[-1], ks[-1], dil[-1], cfg.activation, gr[-1], cfg.dropout
        )
        self.asp = AttentiveStatisticsPooling(
            ch[-1], attention_channels=cfg.attention_channels, global_context=cfg.global_context
        )
        self.asp_bn = BatchNorm1d(ch[-1] * 2)
        self.fc = Conv1d(ch[-1] * 2, cfg.lin_neurons, kernel_size=1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.config.input_size:
            raise ValueError(
                f"expected features [B, T, {self.config.input_size}], got {tuple(x.shape)}"
            )
        x = x.transpose(1, 2)
        b, _, t = x.shape
        frames = None
        if lengths is not None:
            frames = frames_from_relative(lengths, b, t)
            if bool((frames == t).all()):
                frames = None  # nothing padded: plain reflection at the tensor's ends
        outputs = []
        for layer in self.blocks:
            if isinstance(layer, TDNNBlock):
                x = layer(x, frames)
            else:
                x = layer(x, lengths, frames)
            outputs.append(x)
        x = self.mfa(torch.cat(outputs[1:], dim=1), frames)
        x = self.asp(x, lengths)
        x = self.asp_bn(x)
        x = self.fc(x)
        return x.transpose(1, 2)


class _SBBatchNorm1d(nn.Module):
    """SpeechBrain's ``BatchNorm1d`` on ``[B, 1, C]`` inputs (norm over C), weights at ``.norm``."""

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.transpose(1, -1)).transpose(1, -1)


class _SBLinear(nn.Module):
    """SpeechBrain's ``Linear``, weights at ``.w``."""

    def __init__(self, input_size: int, n_neurons: int) -> None:
        super().__init__()
        self.w = nn.Linear(input_size, n_neurons)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w(x)


class CosineClassifier(nn.Module):
    """SpeechBrain's ECAPA ``Classifier``: optional BN+Linear blocks, then the cosine
    similarity between the normalised embedding and each normalised class weight.

    Shapes: ``[B, 1, input_size]`` -> ``[B, 1, out_neurons]`` cosines in ``[-1, 1]``
    (logits of an additive angular margin softmax once scaled).
    """

    def __init__(self, input_size: int, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList()
        for _ in range(config.lin_blocks):
            self.blocks.extend(
                [_SBBatchNorm1d(input_size), _SBLinear(input_size, config.lin_neurons)]
            )
            input_size = config.lin_neurons
        self.weight = nn.Parameter(torch.empty(config.out_neurons, input_size))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.blocks:
            x = layer(x)
        return F.linear(F.normalize(x.squeeze(1)), F.normalize(self.weight)).unsqueeze(1)
