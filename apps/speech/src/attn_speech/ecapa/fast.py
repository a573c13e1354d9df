"""Inference-only ECAPA-TDNN: BatchNorm folded away, convolution + ReLU fused, time-major.

:class:`FastEcapa` computes what :class:`~attn_speech.ecapa.model.EcapaTDNN` (Desplanques
et al. 2020) computes in eval mode (to float32 rounding) with fewer passes over the
activations:

* activations are time-major, ``[B, T, C]``, the layout the convolutions of
  :mod:`attn_speech.ecapa.time_conv` read and write (on the CPU the compiled kernel of
  :mod:`attn_speech.ecapa.conv_kernel`, or oneDNN's with packed weights), so no layer
  transposes its input;
* every TDNN layer is ``BN(relu(conv(x)))``; the ReLU runs inside the convolution and the
  BatchNorm affine ``a * u + b`` is folded into the layers that read it: ``W (a u + b) + c
  = (W a) u + (W b + c)`` for convolutions and the squeeze-excitation's first layer, and
  ``a * u`` into the additions that must stay explicit;
* each Res2Net group's output goes over the columns of the first TDNN's output it was
  computed from, which is then the concatenation the next TDNN reads, so no concatenation
  copies; on the CPU in float32/float64 all groups of a block are one call of the compiled
  kernel of :mod:`attn_speech.ecapa.res2net_kernel` (convolutions, BatchNorms, the next
  group's input and its reflected edges fused), elsewhere (no compiler, bfloat16, other
  devices) each group's input is written into the padded buffer its dilated convolution
  reads, with PyTorch operations;
* attentive statistics pooling reads the aggregation's output with its BatchNorm still
  pending and runs the per-channel softmax directly
  (:mod:`attn_speech.ecapa.fast_pooling`); the final BatchNorm is folded into the embedding
  layer.

Padded batches keep the per-item reflection of the reference model, so embeddings still do
not depend on batch-mates.
"""

from __future__ import annotations

import torch
from torch import nn

from attn_speech.ecapa import res2net_kernel
from attn_speech.ecapa.fast_pooling import FastAttentivePooling, bn_affine
from attn_speech.ecapa.layers import Conv1d, SERes2NetBlock, TDNNBlock
from attn_speech.ecapa.lengths import frames_from_relative
from attn_speech.ecapa.model import EcapaTDNN
from attn_speech.ecapa.time_conv import TimeConv, pad_time, reflect_edges


def _conv_relu(conv: Conv1d, scale=None, shift=None, columns=None, relu=True) -> TimeConv:
    """Fold an input affine (``scale * x + shift`` on ``columns`` of the input channels,
    all of them by default) into ``conv`` and fuse its ReLU (unless ``relu`` is False)."""
    layer = conv.conv
    if layer.groups != 1:
        raise NotImplementedError("grouped convolutions")
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    if scale is not None:
        cols = slice(None) if columns is None else columns
        b = b + (w[:, cols, :] * shift[None, :, None]).sum(dim=(1, 2))
        w[:, cols, :] = w[:, cols, :] * scale[None, :, None]
    return TimeConv(w, b, layer.dilation[0], relu=relu)


class _FastBlock(nn.Module):
    """One SE-Res2Block with its input possibly still ``a_in * u + b_in`` (not applied)."""

    def __init__(self, block: SERes2NetBlock, a_in=None, b_in=None) -> None:
        super().__init__()
        if block.shortcut is not None:
            raise NotImplementedError("SE-Res2Blocks whose width changes")
        self.implicit_input = a_in is not None
        if self.implicit_input:
            self.register_buffer("a_in", a_in)
            self.register_buffer("b_in", b_in)
        self.tdnn1 = _conv_relu(block.tdnn1.conv, a_in, b_in)
        a1, b1 = bn_affine(block.tdnn1.norm)
        res2 = block.res2net_block
        self.scale = res2.scale
        width = a1.numel() // res2.scale
        self.width = width
        groups = []
        for i, sub in enumerate(res2.blocks, start=1):
            cols = slice(i * width, (i + 1) * width)
            # Group 1 reads u directly (scale and shift folded); later groups read
            # a * u + y formed explicitly, so only the shift b is folded.
            scale = a1[cols] if i == 1 else torch.ones_like(a1[cols])
            groups.append(_conv_relu(sub.conv, scale, b1[cols]))
        self.groups = nn.ModuleList(groups)
        if len({g.pad for g in groups}) > 1:
            raise NotImplementedError("Res2Net groups with different paddings")
        self.register_buffer("a1", a1)
        # the groups' BatchNorms and biases, [scale - 1, W]
        norms = [bn_affine(sub.norm) for sub in res2.blocks]
        self.register_buffer("group_scale", torch.stack([a for a, _ in norms]))
        self.register_buffer("group_shift", torch.stack([b for _, b in norms]))
        self.register_buffer("group_bias", torch.stack([conv.bias for conv in groups]))
        self._packed_groups: dict[torch.dtype, torch.Tensor] = {}  # for res2net_kernel
        self.tdnn2 = _conv_relu(block.tdnn2.conv, a1[:width], b1[:width], slice(0, width))
        a2, b2 = bn_affine(block.tdnn2.norm)
        se = block.se_block
        # the squeeze-excitation's two layers on the [B, 1, C] mean, as TimeConvs: on the
        # CPU their weights (read from memory once per call) are split across the threads
        self.se1 = _conv_relu(se.conv1, a2, b2)
        self.se2 = TimeConv(se.conv2.conv.weight, se.conv2.conv.bias, relu=False)
        self.register_buffer("a2", a2)
        self.register_buffer("b2", b2)

    def forward(self, x, out, frames, mask):
        """``x``: block input ``[B, T, C]`` (``u`` when the input is implicit); writes the
        block output into ``out`` ``[B, T, C]`` (may be a view) and returns it."""
        u1 = self.tdnn1(x)
        b, t, _ = u1.shape
        taps = self.groups[0].taps
        if res2net_kernel.supports(u1, self.width, taps):
            self._res2net_compiled(u1, frames)
        else:
            p = self.groups[0].pad
            self._res2net(u1, u1.new_empty(b, t + 2 * p, self.width), frames)
        u2 = self.tdnn2(u1)
        if mask is None:
            m = u2.mean(dim=1)
        else:
            m = (u2 * mask).sum(dim=1) / mask.sum(dim=1)
        g = torch.sigmoid(self.se2(self.se1(m[:, None, :]))[:, 0])
        shift = (self.b2 * g)[:, None, :]
        gain = (self.a2 * g)[:, None, :]
        if self.implicit_input:
            torch.addcmul(shift + self.b_in, u2, gain, out=out)
            out.addcmul_(x, self.a_in)
        else:
            torch.addcmul(shift, u2, gain, out=out)
            out.add_(x)
        return out

    def _res2net(self, u1, buf, frames):
        """The Res2Net groups in place: group ``i``'s output replaces the columns of ``u1``
        it was computed from, so ``u1`` becomes the Res2Net concatenation (its first group
        passes through unchanged)."""
        b, t, w = u1.shape[0], u1.shape[1], self.width
        p = (buf.shape[1] - t) // 2
        y = None
        inner = buf[:, p : p + t] if frames is None else u1.new_empty(b, t, w)
        for i, conv in enumerate(self.groups, start=1):
            cols = slice(i * w, (i + 1) * w)
            if y is None:
                inner.copy_(u1[..., cols])
            else:
                torch.addcmul(y, u1[..., cols], self.a1[cols], out=inner)
            if frames is None:
                reflect_edges(buf, p)
            else:
                pad_time(inner, p, frames, out=buf)
            y = torch.addcmul(
                self.group_shift[i - 1], conv(buf), self.group_scale[i - 1], out=u1[..., cols]
            )

    def _res2net_compiled(self, u1, frames):
        """:meth:`_res2net` as one call of :func:`attn_speech.ecapa.res2net_kernel.res2net`."""
        dtype = u1.dtype
        packed = self._packed_groups.get(dtype)
        if packed is None:
            weights = [conv.weight for conv in self.groups]
            packed = self._packed_groups[dtype] = res2net_kernel.pack_groups(weights, dtype)
        first = self.groups[0]
        res2net_kernel.res2net(
            u1, packed, self.group_bias.to(dtype), self.group_scale.to(dtype),
            self.group_shift.to(dtype), self.a1.to(dtype), first.taps, first.dilation, frames,
        )  # fmt: skip


class FastEcapa(nn.Module):
    """Inference-only twin of an :class:`EcapaTDNN` in eval mode (same inputs and outputs).

    Raises ``NotImplementedError`` for configurations it does not cover (grouped
    convolutions, activations other than ReLU, blocks that change width, Res2Net groups
    with different paddings); :class:`~attn_speech.ecapa.inference.Embedder` then keeps
    the reference model.
    """

    def __init__(self, model: EcapaTDNN) -> None:
        super().__init__()
        cfg = model.config
        if cfg.activation != "relu":
            raise NotImplementedError(f"activation {cfg.activation}")
        first = model.blocks[0]
        if not isinstance(first, TDNNBlock):
            raise NotImplementedError("first layer must be a TDNN block")
        self.first = _conv_relu(first.conv)
        a0, b0 = bn_affine(first.norm)
        blocks = [_FastBlock(model.blocks[1], a0, b0)]
        blocks += [_FastBlock(b) for b in model.blocks[2:]]
        self.blocks = nn.ModuleList(blocks)
        self.width = cfg.channels[1]
        self.mfa = _conv_relu(model.mfa.conv)
        self.mfa.strassen = True  # 3C x 3C: half of the network's products
        self.asp = FastAttentivePooling(model.asp, *bn_affine(model.mfa.norm))
        a, b = bn_affine(model.asp_bn)
        self.fc = _conv_relu(model.fc, a, b, relu=False)
        self.input_size = cfg.input_size
        self.eval()

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ValueError(f"expected features [B, T, {self.input_size}], got {tuple(x.shape)}")
        b, t, _ = x.shape
        frames, mask = None, None
        if lengths is not None:
            frames = frames_from_relative(lengths, b, t)
            if bool((frames == t).all()):
                frames = None
            else:
                valid = torch.arange(t, device=x.device) < frames.to(x.device)[:, None]
                mask = valid[..., None].to(x.dtype)
        h = self.first(pad_time(x, self.first.pad, frames))
        n = len(self.blocks)
        agg = h.new_empty(b, t, self.width * n)
        for i, block in enumerate(self.blocks):
            # each block writes its columns of the aggregation's input; the next block reads
            # them there (the convolutions take the row stride as it is)
            h = block(h, agg[..., i * self.width : (i + 1) * self.width], frames, mask)
        pooled = self.asp(self.mfa(agg), frames)
        return self.fc(pooled.to(self.fc.weight.dtype)[:, None, :])
