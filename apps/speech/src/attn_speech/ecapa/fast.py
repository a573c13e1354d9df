"""Inference-only ECAPA-TDNN: BatchNorm folded away, convolution + ReLU fused.

:class:`FastEcapa` computes what :class:`~attn_speech.ecapa.model.EcapaTDNN` computes in
eval mode (to float32 rounding) with fewer passes over the activations:

* every TDNN layer is ``BN(relu(conv(x)))``; the ReLU runs inside the convolution (a
  oneDNN post-op on the CPU, with weights reordered once) and the BatchNorm affine
  ``a * u + b`` is folded into the layers that read it: ``W (a u + b) + c = (W a) u +
  (W b + c)`` for convolutions and the squeeze-excitation's mean, and ``a * u`` into the
  additions that must stay explicit;
* the Res2Net groups are written straight into the buffer the next TDNN reads, and the
  SE-Res2Blocks' outputs straight into the buffer of the multi-layer aggregation, so no
  concatenation copies;
* the final BatchNorm is folded into the embedding layer.

Attentive statistics pooling is :class:`core_attention.layers.AttentiveStatisticsPooling`
unchanged. Padded batches keep the per-item reflection of the reference model, so
embeddings still do not depend on batch-mates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attn_speech.ecapa.layers import BatchNorm1d, Conv1d, SERes2NetBlock, TDNNBlock, reflect_index
from attn_speech.ecapa.lengths import frame_mask, frames_from_relative
from attn_speech.ecapa.model import EcapaTDNN

_MKLDNN = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight")
)


def _affine(norm: BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``a * x + b`` per channel."""
    bn = norm.norm
    a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return a.detach().clone(), (bn.bias - bn.running_mean * a).detach().clone()


class _ConvReLU(nn.Module):
    """``relu(conv1d(x))`` on an input that already holds its padding.

    On the CPU it runs oneDNN's convolution with the ReLU as a post-op and the weights
    reordered once into oneDNN's blocked layout (as a 1xk 2-D kernel: oneDNN reorders only
    2-D/3-D weights). ``conv1d`` would reorder them on every call, which costs up to a third
    of the time of the 3C x 3C aggregation layer.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, dilation: int) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().clone().contiguous())
        self.register_buffer("bias", bias.detach().clone().contiguous())
        self.dilation = dilation
        self.pad = dilation * (weight.shape[-1] - 1) // 2
        self._packed: tuple[torch.dtype, torch.Tensor] | None = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_packed"] = None  # an opaque oneDNN tensor; rebuilt on first use
        return state

    def _onednn_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self._packed is None or self._packed[0] != dtype:
            w = self.weight.to(dtype)[:, :, None, :]
            shape = [1, w.shape[1], 1, 400]  # a typical input; any length works
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                w, [0, 0], [1, 1], [1, self.dilation], 1, shape
            )
            self._packed = (dtype, packed)
        return self._packed[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _MKLDNN and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
            y = torch.ops.mkldnn._convolution_pointwise(
                x[:, :, None, :],
                self._onednn_weight(x.dtype),
                self.bias.to(x.dtype),
                [0, 0],
                [1, 1],
                [1, self.dilation],
                1,
                "relu",
                [],
                "",
            )
            return y[:, :, 0, :]
        return torch.relu_(F.conv1d(x, self.weight, self.bias, dilation=self.dilation))


def _conv_relu(conv: Conv1d, scale=None, shift=None, columns=None) -> _ConvReLU:
    """Fold an input affine (``scale * x + shift`` on ``columns`` of the input channels,
    all of them by default) into ``conv`` and fuse its ReLU."""
    layer = conv.conv
    if layer.groups != 1:
        raise NotImplementedError("grouped convolutions")
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    if scale is not None:
        cols = slice(None) if columns is None else columns
        b = b + (w[:, cols, :] * shift[None, :, None]).sum(dim=(1, 2))
        w[:, cols, :] = w[:, cols, :] * scale[None, :, None]
    return _ConvReLU(w, b, layer.dilation[0])


def _pad(x: torch.Tensor, pad: int, frames: torch.Tensor | None) -> torch.Tensor:
    """ "Same" reflection padding, at each item's own last frame when ``frames`` is given."""
    if pad == 0:
        return x
    if frames is None:
        return F.pad(x, (pad, pad), mode="reflect")
    index = reflect_index(frames.to(x.device), x.shape[-1], pad)
    return torch.gather(x, 2, index[:, None, :].expand(-1, x.shape[1], -1))


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
        a1, b1 = _affine(block.tdnn1.norm)
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
        self.register_buffer("a1", a1)
        for i, (a, b) in enumerate(_affine(sub.norm) for sub in res2.blocks):
            self.register_buffer(f"ga{i}", a)
            self.register_buffer(f"gb{i}", b)
        self.tdnn2 = _conv_relu(block.tdnn2.conv, a1[:width], b1[:width], slice(0, width))
        a2, b2 = _affine(block.tdnn2.norm)
        se = block.se_block
        w1 = se.conv1.conv.weight[:, :, 0].detach()
        self.register_buffer("se_w1", (w1 * a2[None, :]).clone())
        self.register_buffer("se_b1", (se.conv1.conv.bias.detach() + w1 @ b2).clone())
        self.register_buffer("se_w2", se.conv2.conv.weight[:, :, 0].detach().clone())
        self.register_buffer("se_b2", se.conv2.conv.bias.detach().clone())
        self.register_buffer("a2", a2)
        self.register_buffer("b2", b2)

    def forward(self, x, out, frames, mask):
        """``x``: block input ``[B, C, T]`` (``u`` when the input is implicit); writes
        the block output into ``out`` (a view of the aggregation buffer) and returns it."""
        u1 = self.tdnn1(x)
        w = self.width
        cat = torch.empty_like(u1)
        cat[:, :w] = u1[:, :w]
        y = None
        for i, conv in enumerate(self.groups, start=1):
            cols = slice(i * w, (i + 1) * w)
            z = u1[:, cols] if y is None else torch.addcmul(y, u1[:, cols], self.a1[cols, None])
            a, b = getattr(self, f"ga{i - 1}"), getattr(self, f"gb{i - 1}")
            y = torch.addcmul(
                b[:, None], conv(_pad(z, conv.pad, frames)), a[:, None], out=cat[:, cols]
            )
        u2 = self.tdnn2(cat)
        if mask is None:
            m = u2.mean(dim=2)
        else:
            m = (u2 * mask).sum(dim=2) / mask.sum(dim=2)
        g = torch.sigmoid(
            F.linear(F.relu(F.linear(m, self.se_w1, self.se_b1)), self.se_w2, self.se_b2)
        )
        shift = (self.b2 * g)[:, :, None]
        gain = (self.a2 * g)[:, :, None]
        if self.implicit_input:
            torch.addcmul(shift + self.b_in[:, None], u2, gain, out=out)
            out.addcmul_(x, self.a_in[:, None])
        else:
            torch.addcmul(shift, u2, gain, out=out)
            out.add_(x)
        return out


class FastEcapa(nn.Module):
    """Inference-only twin of an :class:`EcapaTDNN` in eval mode (same inputs and outputs).

    Raises ``NotImplementedError`` for configurations it does not cover (grouped
    convolutions, activations other than ReLU, blocks that change width); use the
    reference model for those.
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
        a0, b0 = _affine(first.norm)
        blocks = [_FastBlock(model.blocks[1], a0, b0)]
        blocks += [_FastBlock(b) for b in model.blocks[2:]]
        self.blocks = nn.ModuleList(blocks)
        self.width = cfg.channels[1]
        self.mfa = _conv_relu(model.mfa.conv)
        am, bm = _affine(model.mfa.norm)
        self.register_buffer("am", am)
        self.register_buffer("bm", bm)
        self.asp = model.asp
        a, b = _affine(model.asp_bn)
        w = model.fc.conv.weight[:, :, 0].detach()
        self.register_buffer("fc_w", (w * a[None, :]).clone())
        self.register_buffer("fc_b", (model.fc.conv.bias.detach() + w @ b).clone())
        self.input_size = cfg.input_size
        self.eval()

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ValueError(f"expected features [B, T, {self.input_size}], got {tuple(x.shape)}")
        x = x.transpose(1, 2)
        b, _, t = x.shape
        frames, mask = None, None
        if lengths is not None:
            frames = frames_from_relative(lengths, b, t)
            if bool((frames == t).all()):
                frames = None
            else:
                mask = frame_mask(frames, t, device=x.device)[:, None, :].to(x.dtype)
        u0 = self.first(_pad(x, self.first.pad, frames))
        agg = u0.new_empty(b, self.width * len(self.blocks), t)
        h = u0
        for i, block in enumerate(self.blocks):
            out = agg[:, i * self.width : (i + 1) * self.width]
            h = block(h, out, frames, mask)
        xm = torch.addcmul(
            self.bm[:, None], self.mfa(_pad(agg, self.mfa.pad, frames)), self.am[:, None]
        )
        pooled = self.asp(xm, lengths)[:, :, 0]
        return F.linear(pooled, self.fc_w, self.fc_b)[:, None, :]
