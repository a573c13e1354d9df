"""Attentive statistics pooling (Okabe et al. 2018, "Attentive Statistics Pooling for Deep
Speaker Embedding", Interspeech) with the channel-dependent attention and global context
of ECAPA-TDNN (Desplanques et al. 2020, "ECAPA-TDNN: Emphasized Channel Attention,
Propagation and Aggregation in TDNN Based Speaker Verification", Interspeech).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from core_attention.functional import attention
from core_attention.layers._lengths import frame_mask, relative_to_frames
from core_attention.layers.squeeze_excite import pointwise_conv1d

__all__ = ["AttentiveStatisticsPooling"]


def _tdnn_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 conv -> ReLU -> BatchNorm with the names of SpeechBrain's ``TDNNBlock``."""
    return nn.Sequential(
        OrderedDict(
            conv=pointwise_conv1d(in_channels, out_channels),
            activation=nn.ReLU(),
            norm=nn.Sequential(OrderedDict(norm=nn.BatchNorm1d(out_channels))),
        )
    )


class AttentiveStatisticsPooling(nn.Module):
    """Attention-weighted mean and standard deviation of each channel over time.

    Per channel ``c`` and frame ``t`` a score ``e_ct = W_2 tanh(TDNN([x; mean; std]))_ct``
    is computed (``mean``/``std``: the unweighted statistics over valid frames, the global
    context, appended when ``global_context``); ``alpha_c = softmax_t(e_c)`` over valid
    frames; the output is ``[sum_t alpha_ct x_ct ; sqrt(sum_t alpha_ct (x_ct - mu_c)^2)]``.

    The weighted sums are attention with one head per channel, one query and
    ``q . k = e_ct`` (unit query, the scores as one-dimensional keys, scale 1), run through
    :func:`core_attention.attention` with the valid frames as ``key_lengths``.

    Constructor arguments, ``forward`` and parameter names and shapes (``tdnn.conv.conv.*``,
    ``tdnn.norm.norm.*``, ``conv.conv.*``) are those of SpeechBrain's
    ``AttentiveStatisticsPooling`` (``speechbrain.lobes.models.ECAPA_TDNN``), so its state
    dicts load strictly and the outputs agree.

    Args:
        channels: input channels ``C``.
        attention_channels: bottleneck channels of the scoring TDNN.
        global_context: append utterance mean and std to the scoring input.
        eps: floor of the variance before the square root.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` for the attention.

    Shapes:
        ``forward(x, lengths=None)``: ``x`` ``[B, C, T]``; ``lengths`` ``[B]`` relative
        lengths in ``[0, 1]`` (frame ``t`` is valid when ``t < lengths * T``); returns
        ``[B, 2C, 1]`` (means then standard deviations). An item with no valid frame pools
        to ``[0; sqrt(eps)]`` (SpeechBrain returns NaN there).
    """

    def __init__(
        self,
        channels: int,
        attention_channels: int = 128,
        global_context: bool = True,
        *,
        eps: float = 1e-12,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.eps = eps
        self.global_context = global_context
        self.backend = backend
        in_channels = channels * 3 if global_context else channels
        self.tdnn = _tdnn_block(in_channels, attention_channels)
        self.tanh = nn.Tanh()
        self.conv = pointwise_conv1d(attention_channels, channels)

    def _weighted_stats(self, x, scores, frames):
        """Attention mean and std ``[B, C]`` of ``x`` under ``softmax_t(scores)``."""
        b, c, _ = x.shape
        query = x.new_ones(b, c, 1, 1)
        keys = scores[..., None]  # [B, C, T, 1]: one head per channel

        def pool(values):
            out = attention(
                query,
                keys,
                values[..., None],
                scale=1.0,
                key_lengths=frames,
                backend=self.backend,
            )
            return out[:, :, 0, 0]

        mean = pool(x)
        var = pool((x - mean[..., None]).pow(2))
        return mean, var.clamp(min=self.eps).sqrt()

    def _global_context_projection(self, x, mean, std):
        """The scoring TDNN's 1x1 conv of ``[x; mean; std]`` without building the ``3C x T``
        input: the mean and std columns are constant over time, so their part of the
        projection is one ``[B, A]`` vector added to the conv of ``x``."""
        conv = self.tdnn.conv.conv
        c = x.shape[1]
        weight = conv.weight[..., 0]  # [A, 3C]
        context = mean @ weight[:, c : 2 * c].T + std @ weight[:, 2 * c :].T  # [B, A]
        if conv.bias is not None:
            context = context + conv.bias
        return F.conv1d(x, weight[:, :c, None]) + context[..., None]

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"x must be [B, C, T], got shape {tuple(x.shape)}")
        b, _, t = x.shape
        frames = relative_to_frames(lengths, b, t, x.device)
        if self.global_context:
            weights = frame_mask(frames, t).to(x.dtype) / frames.clamp(min=1).to(x.dtype)[:, None]
            weights = weights[:, None, :]
            mean = (weights * x).sum(dim=2, keepdim=True)
            std = (weights * (x - mean).pow(2)).sum(dim=2, keepdim=True).clamp(self.eps).sqrt()
            hidden = self._global_context_projection(x, mean[..., 0], std[..., 0])
            hidden = self.tdnn.norm(self.tdnn.activation(hidden))
        else:
            hidden = self.tdnn(x)
        scores = self.conv(self.tanh(hidden))
        mean, std = self._weighted_stats(x, scores, frames)
        return torch.cat([mean, std], dim=1)[..., None]
