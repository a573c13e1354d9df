"""Time-major 1-D convolutions for :mod:`attn_speech.ecapa.fast`.

Activations are ``[B, T, C]`` (time-major). On the CPU a convolution is oneDNN's, with the
weights reordered once into its blocked layout (as a ``1 x k`` 2-D kernel: oneDNN reorders
only 2-D/3-D weights) and an optional ReLU post-op. With reordered weights oneDNN runs the
convolution channels-last, which is the time-major layout: a ``[B, T, C]`` input is read in
place and the output comes back ``[B, T, C]`` contiguous, so no layer transposes its input
(a channels-first input would be copied into channels-last on every call).

Elsewhere (other devices, no oneDNN) a ``k``-tap dilated convolution is ``k`` accumulated
GEMMs over shifted row views of the padded input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attn_speech.ecapa.layers import reflect_index

ONEDNN = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight")
)


class TimeConv(nn.Module):
    """``act(conv1d(x))`` on a time-major input that already holds its padding.

    Shapes: ``weight`` ``[C_out, C_in, k]`` (``nn.Conv1d``'s), ``bias`` ``[C_out]``;
    ``forward(x, bias=None, relu=None)``: ``x`` ``[B, T + 2 p, C_in]`` with ``p = dilation
    (k - 1) / 2`` -> ``[B, T, C_out]``. ``bias`` and ``relu`` replace the stored ones for
    this call.
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor, dilation: int = 1, relu: bool = True
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().clone().contiguous())
        self.register_buffer("bias", bias.detach().clone().contiguous())
        self.dilation = dilation
        self.relu = relu
        self.taps = weight.shape[-1]
        self.pad = dilation * (self.taps - 1) // 2
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

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, relu: bool | None = None
    ) -> torch.Tensor:
        bias = self.bias if bias is None else bias
        relu = self.relu if relu is None else relu
        if ONEDNN and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
            y = torch.ops.mkldnn._convolution_pointwise(
                x.transpose(1, 2)[:, :, None, :],  # channels-last view, no copy
                self._onednn_weight(x.dtype),
                bias.to(x.dtype),
                [0, 0],
                [1, 1],
                [1, self.dilation],
                1,
                "relu" if relu else "none",
                [],
                "",
            )
            return y[:, :, 0, :].transpose(1, 2).contiguous()  # a no-op: already [B, T, C]
        t = x.shape[1] - 2 * self.pad
        w = self.weight.to(x.dtype)
        y = F.linear(x[:, :t], w[:, :, 0], bias.to(x.dtype))
        for j in range(1, self.taps):
            s = j * self.dilation
            y = y + F.linear(x[:, s : s + t], w[:, :, j])
        return torch.relu_(y) if relu else y


def pad_time(
    x: torch.Tensor, pad: int, frames: torch.Tensor | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """SpeechBrain's "same" reflection padding of a time-major ``x`` ``[B, T, C]`` ->
    ``[B, T + 2 pad, C]``, each item reflected at its own last frame when ``frames``
    ``[B]`` is given (see :func:`attn_speech.ecapa.layers.reflect_index`)."""
    b, t, c = x.shape
    if pad == 0:
        return x if out is None else out.copy_(x)
    lengths = frames if frames is not None else torch.full((1,), t, dtype=torch.long)
    index = reflect_index(lengths.to(x.device), t, pad)
    if out is None:
        out = x.new_empty(b, t + 2 * pad, c)
    return torch.gather(x, 1, index[:, :, None].expand(b, -1, c), out=out)


def reflect_edges(buf: torch.Tensor, pad: int) -> torch.Tensor:
    """Fill the first and last ``pad`` rows of ``buf`` ``[B, T + 2 pad, C]`` with the
    reflection of its interior ``buf[:, pad : pad + T]`` (every item filling ``T``)."""
    if pad == 0:
        return buf
    t = buf.shape[1] - 2 * pad
    if t <= pad:  # reflections that fold more than once: the general index
        src = reflect_index(torch.tensor([t], device=buf.device), t, pad)[0] + pad
        buf[:, :pad] = buf[:, src[:pad]]
        buf[:, pad + t :] = buf[:, src[pad + t :]]
        return buf
    # row u < pad reads interior frame pad - u; row pad + t + j reads frame t - 2 - j
    buf[:, :pad] = buf[:, pad + 1 : 2 * pad + 1].flip(1)
    buf[:, pad + t :] = buf[:, t - 1 : pad + t - 1].flip(1)
    return buf
