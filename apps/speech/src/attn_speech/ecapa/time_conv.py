"""Time-major 1-D convolutions for :mod:`attn_speech.ecapa.fast`.

Activations are ``[B, T, C]`` (time-major). On CPUs with AVX-512, float32 and float64
layers whose outputs come in whole vectors of 16 channels run the compiled kernel of
:mod:`attn_speech.ecapa.conv_kernel` (weights packed once, any input length). Other CPU
layers (bfloat16, no compiler, no AVX-512) run oneDNN's convolution, with the
weights reordered into its blocked layout (as a ``1 x k`` 2-D kernel: oneDNN reorders only
2-D/3-D weights) and an optional ReLU post-op. With reordered weights oneDNN runs the
convolution channels-last, which is the time-major layout: a ``[B, T, C]`` input is read in
place and the output comes back ``[B, T, C]`` contiguous, so no layer transposes its input
(a channels-first input would be copied into channels-last on every call).

The blocked layout a oneDNN convolution wants depends on the input's shape and the thread
count, not only on the weights: a 1536-channel 1x1 convolution blocks its output channels
by 48 at 400 frames and by 64 at 250. Weights packed for another layout are converted on
every call by oneDNN's generic reorder, tens of times slower than the convolution itself
(a 1536-channel aggregation layer, C=512, ran at 6-60 GMAC/s instead of ~240 for most
lengths). So each layer packs its weights once per layout, and which layout an input shape
wants is learnt the first time the shape is seen (one reorder), for all layers of that
weight shape at once. 1x1 weights above 32 MiB (the C=1024 aggregation layer's 36 MiB in
float32) run as oneDNN's inner product instead: glibc maps blocks that large afresh every
time, so learning a layout would cost some 12 ms of page faults per new length, and the
inner product, a matrix product over the ``B * T`` rows as fast as the convolution in
float32, packs its weights once for every number of rows. (In bfloat16 the convolution is
about 5 % faster on that layer, and its 18 MiB of weights stay below the line.)

A layer marked ``strassen`` runs as one level of Strassen's algorithm
(:mod:`attn_speech.ecapa.strassen_kernel`, 7/8 of the products) where that kernel takes the
input: on the CPU, float32/float64, at least 128 rows and 2048 input channels.

Elsewhere (other devices, no oneDNN) a ``k``-tap dilated convolution is ``k`` accumulated
GEMMs over shifted row views of the padded input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attn_speech.ecapa import conv_kernel, strassen_kernel
from attn_speech.ecapa.layers import reflect_index
from core_attention.cpu_memory import MMAP_THRESHOLD

ONEDNN = torch.backends.mkldnn.is_available() and all(
    hasattr(torch.ops.mkldnn, op)
    for op in (
        "_convolution_pointwise",
        "_reorder_convolution_weight",
        "_linear_pointwise",
        "_reorder_linear_weight",
        "_get_mkldnn_serialized_md",
    )
)


STRASSEN = True  # whether layers marked `strassen` take strassen_kernel where it supports them
NATIVE = True  # whether float32/float64 layers on the CPU take conv_kernel where it builds

# (weight shape, dilation, dtype, batch, padded frames, threads) -> oneDNN's layout for it
_LAYOUT_OF_PROBLEM: dict[tuple, bytes] = {}
_MAX_PROBLEMS = 65536  # a few ints each; cleared when full (then learnt again)
# 1x1 weights larger than this run as an inner product: glibc maps blocks above it afresh on
# every allocation whatever its settings, so a layout learnt by a reorder would fault them in
_INNER_PRODUCT_BYTES = MMAP_THRESHOLD


class TimeConv(nn.Module):
    """``act(conv1d(x))`` on a time-major input that already holds its padding.

    Shapes: ``weight`` ``[C_out, C_in, k]`` (``nn.Conv1d``'s), ``bias`` ``[C_out]``;
    ``forward(x, bias=None, relu=None)``: ``x`` ``[B, T + 2 p, C_in]`` with ``p = dilation
    (k - 1) / 2`` -> ``[B, T, C_out]``. ``bias`` and ``relu`` replace the stored ones for
    this call. With ``strassen`` set (FastEcapa sets it on its aggregation layer), a 1x1
    layer runs one Strassen level where :func:`strassen_kernel.supports` takes the input.
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor, dilation: int = 1, relu: bool = True
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().clone().contiguous())
        self.register_buffer("bias", bias.detach().clone().contiguous())
        self.dilation = dilation
        self.relu = relu
        # one Strassen level (strassen_kernel) where the layer and input allow: set for the
        # large 1x1 layers whose products repay it
        self.strassen = False
        self.taps = weight.shape[-1]
        self.pad = dilation * (self.taps - 1) // 2
        # (dtype, layout) -> packed weights (conv_kernel's under layout "native", else opaque
        # oneDNN tensors), rebuilt on first use
        self._packed: dict[tuple, torch.Tensor] = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_packed"] = {}
        return state

    def inner_product(self, dtype: torch.dtype) -> bool:
        """Whether oneDNN runs this layer as an inner product in ``dtype`` (see the module
        docstring)."""
        size = self.weight.numel() * dtype.itemsize
        return self.taps == 1 and size > _INNER_PRODUCT_BYTES

    def _packing(self, dtype: torch.dtype, layout, pack, *args) -> torch.Tensor:
        """The weights packed for ``layout`` in ``dtype``: ``pack(*args)`` on first use."""
        packed = self._packed.get((dtype, layout))
        if packed is None:
            packed = self._packed[(dtype, layout)] = pack(*args)
        return packed

    def _native_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weights packed for :mod:`attn_speech.ecapa.conv_kernel`."""
        return self._packing(dtype, "native", conv_kernel.pack_weight, self.weight, dtype)

    def _strassen_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The seven weight combinations packed for :mod:`attn_speech.ecapa.strassen_kernel`."""
        return self._packing(dtype, "strassen", strassen_kernel.pack_products, self.weight, dtype)

    def _linear_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weights packed for oneDNN's inner product (one packing for all row counts)."""

        def pack():
            return torch.ops.mkldnn._reorder_linear_weight(self.weight[:, :, 0].to(dtype), 1024)

        return self._packing(dtype, None, pack)

    def _conv_weight(self, x: torch.Tensor) -> torch.Tensor:
        """The weights in the blocked layout oneDNN's convolution picks for input ``x``
        ``[B, T', C]``."""
        problem = (self.weight.shape, self.dilation, x.dtype, x.shape[0], x.shape[1])
        problem += (torch.get_num_threads(),)
        layout = _LAYOUT_OF_PROBLEM.get(problem)
        packed = self._packed.get((x.dtype, layout))
        if packed is None:
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                self.weight.to(x.dtype)[:, :, None, :],
                [0, 0],
                [1, 1],
                [1, self.dilation],
                1,
                [x.shape[0], x.shape[2], 1, x.shape[1]],
            )
            layout = torch.ops.mkldnn._get_mkldnn_serialized_md(packed).numpy().tobytes()
            packed = self._packed.setdefault((x.dtype, layout), packed)
            if len(_LAYOUT_OF_PROBLEM) >= _MAX_PROBLEMS:
                _LAYOUT_OF_PROBLEM.clear()
            _LAYOUT_OF_PROBLEM[problem] = layout
        return packed

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, relu: bool | None = None
    ) -> torch.Tensor:
        bias = self.bias if bias is None else bias
        relu = self.relu if relu is None else relu
        if self.strassen and STRASSEN and NATIVE and strassen_kernel.supports(x, self.weight):
            packed = self._strassen_weight(x.dtype)
            return strassen_kernel.strassen(x, packed, self.weight.shape[0], bias, relu)
        if NATIVE and conv_kernel.supports(x, self.weight):
            weight = self._native_weight(x.dtype)
            n, _, taps = self.weight.shape
            return conv_kernel.conv(x, weight, n, taps, self.dilation, bias, relu)
        if ONEDNN and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
            act = "relu" if relu else "none"
            if self.inner_product(x.dtype):
                weight = self._linear_weight(x.dtype)
                return torch.ops.mkldnn._linear_pointwise(x, weight, bias.to(x.dtype), act, [], "")
            y = torch.ops.mkldnn._convolution_pointwise(
                x.transpose(1, 2)[:, :, None, :],  # channels-last view, no copy
                self._conv_weight(x),
                bias.to(x.dtype),
                [0, 0],
                [1, 1],
                [1, self.dilation],
                1,
                act,
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
