"""Attentive statistics pooling on time-major activations, for :mod:`attn_speech.ecapa.fast`.

Computes what :class:`core_attention.layers.AttentiveStatisticsPooling` computes (Okabe et
al. 2018, "Attentive Statistics Pooling for Deep Speaker Embedding"; the channel-dependent
attention with global context of ECAPA-TDNN, Desplanques et al. 2020) in eval mode, with
the input still ``x = a * u + b`` per channel (the multi-layer aggregation's BatchNorm, not
applied):

* the statistics of ``x`` come from those of ``u``: ``mean_x = a mean_u + b``,
  ``var_x = a^2 var_u``, so ``x`` is never formed;
* the scoring layer's 1x1 convolution of ``[x; mean; std]`` is ``(W_x a) u`` plus one
  ``[B, A]`` vector (``W_x b + W_m mean + W_s std + bias``);
* the per-channel softmax over time runs directly on the ``[B, T, C]`` scores (its
  normalisation applied to the weighted sums), not as an attention call with one head of
  size 1 per channel;
* on the CPU in float32/float64 both statistics (the global context's and the pooled
  output's) come from one pass of the compiled kernel of
  :mod:`attn_speech.ecapa.pooling_kernel` each, and the scoring convolution runs inside
  the second pass, tile by tile, so the ``[B, T, C]`` scores are never written to memory
  (writing and reading them back cost more than computing them); elsewhere (no
  compiler, bfloat16, other devices) from PyTorch operations.
"""

from __future__ import annotations

import torch
from torch import nn

from attn_speech.ecapa import pooling_kernel
from attn_speech.ecapa.time_conv import TimeConv
from core_attention.layers.attentive_pooling import AttentiveStatisticsPooling


def bn_affine(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm as ``a * x + b`` per channel, ``(a, b)``: ``norm`` a
    SpeechBrain-style wrapper (``layers.BatchNorm1d``, core_attention's) of an
    ``nn.BatchNorm1d`` ``norm.norm``."""
    bn = norm.norm
    a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return a.detach().clone(), (bn.bias - bn.running_mean * a).detach().clone()


class FastAttentivePooling(nn.Module):
    """Inference twin of an :class:`AttentiveStatisticsPooling` reading ``x = a u + b``.

    Shapes: ``a``, ``b`` ``[C]``; ``forward(u, frames=None)``: ``u`` ``[B, T, C]``;
    ``frames`` ``[B]`` valid frames (``None``: all) -> ``[B, 2C]`` (means, then standard
    deviations, of ``x``).
    """

    def __init__(self, asp: AttentiveStatisticsPooling, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        c = a.numel()
        conv = asp.tdnn.conv.conv
        w = conv.weight[..., 0].detach()  # [A, C] or [A, 3C]
        bias = conv.bias.detach() if conv.bias is not None else w.new_zeros(w.shape[0])
        self.global_context = asp.global_context
        self.eps = asp.eps
        self.register_buffer("a", a.detach().clone())
        self.register_buffer("b", b.detach().clone())
        self.register_buffer("a2", (a * a).detach().clone())
        self.hidden = TimeConv((w[:, :c] * a[None, :])[..., None], bias + w[:, :c] @ b)
        if self.global_context:  # [mean; std] -> the hidden layer's bias, a [B, 1, 2C] input
            self.context = TimeConv(w[:, c:, None], self.hidden.bias, relu=False)
        hidden_a, hidden_b = bn_affine(asp.tdnn.norm)
        self.register_buffer("hidden_a", hidden_a)
        self.register_buffer("hidden_b", hidden_b)
        score = asp.conv.conv
        score_bias = score.bias if score.bias is not None else score.weight.new_zeros(c)
        self.scores = TimeConv(score.weight.detach(), score_bias.detach(), relu=False)
        wt, padded_bias = pooling_kernel.pack_scorer(score.weight[..., 0].detach(), score_bias)
        self.register_buffer("score_wt", wt.detach().clone())
        self.register_buffer("score_bias", padded_bias.detach().clone())

    def forward(self, u: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = u.shape
        kernel = pooling_kernel.supports(u)
        valid = None
        if frames is not None and not kernel:
            valid = (torch.arange(t, device=u.device) < frames.to(u.device)[:, None])[..., None]
        if self.global_context:
            if kernel:
                stats = pooling_kernel.mean_std(u, self.a, self.b, self.eps, frames)
            else:
                stats = self._mean_std(u, frames, valid)
            context = self.context(stats[:, None, :])[:, 0]
        else:
            context = self.hidden.bias.expand(b, -1)
        if b == 1:
            h = self.hidden(u, context[0])
        else:
            h = self.hidden(u, torch.zeros_like(context[0]), relu=False)
            h = h.add_(context[:, None]).relu_()
        h = torch.addcmul(self.hidden_b, h, self.hidden_a).tanh_()
        if kernel:
            return pooling_kernel.attentive_mean_std(
                h, self.score_wt, self.score_bias, u, self.a, self.b, self.eps, frames
            )
        return self._attentive_mean_std(self.scores(h), u, valid)

    def _mean_std(self, u, frames, valid):
        """PyTorch path: ``[mean; std]`` of ``x`` over the valid frames, ``[B, 2C]``."""
        if valid is None:
            mean_u = u.mean(dim=1)  # var_mean over a non-inner dim is ~10x slower
            var_u = (u - mean_u[:, None]).square_().mean(dim=1)
        else:
            w = valid.to(u.dtype) / frames.clamp(min=1).to(u)[:, None, None]
            mean_u = (u * w).sum(dim=1)
            var_u = ((u - mean_u[:, None]).square_() * w).sum(dim=1)
        mean = torch.addcmul(self.b, mean_u, self.a)
        std = (var_u * self.a2).clamp_(min=self.eps).sqrt_()
        return torch.cat([mean, std], dim=1)

    def _attentive_mean_std(self, scores, u, valid):
        """PyTorch path: softmax-weighted ``[mean; std]`` of ``x``, ``[B, 2C]``."""
        if u.dtype not in (torch.float32, torch.float64):  # bfloat16 networks pool in float32
            scores, u = scores.float(), u.float()
        if valid is not None:
            scores = scores.masked_fill_(~valid, float("-inf"))
        # softmax over time per channel, its normalisation applied to the two sums instead
        # of the [B, T, C] weights (torch.softmax over a non-inner dim is several times slower)
        e = scores.sub_(scores.amax(dim=1, keepdim=True)).exp_()
        total = e.sum(dim=1)
        mean_u = (e * u).sum(dim=1).div_(total)
        var_u = (u - mean_u[:, None]).square_().mul_(e).sum(dim=1).div_(total)
        mean = torch.addcmul(self.b.to(u.dtype), mean_u, self.a.to(u.dtype))
        std = (var_u * self.a2.to(u.dtype)).clamp_(min=self.eps).sqrt_()
        return torch.cat([mean, std], dim=1)
