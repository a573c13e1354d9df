"""Halo attention from HaloNet (Vaswani et al., "Scaling Local Self-Attention for Parameter
Efficient Visual Backbones", CVPR 2021).

The feature map is cut into non-overlapping ``b x b`` query blocks; each block attends the
``(b + 2h) x (b + 2h)`` window around it (the block plus a halo of ``h`` pixels), with
relative-position logits factorised into a height and a width term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core_attention.backends import BACKENDS, requested_backend
from core_attention.functional import attention

__all__ = ["HaloAttention", "PosEmbedRel"]


def _make_divisible(v: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """Nearest multiple of ``divisor``, not below ``divisor`` nor below ``round_limit * v``
    (the channel rounding of timm's ``make_divisible``)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


class PosEmbedRel(nn.Module):
    """Relative-position logits of a ``block_size x block_size`` query block against its
    ``win_size x win_size`` key window (Bello et al. 2019, as used by HaloNet).

    The logit of query ``(y, x)`` for key ``(i, j)`` of the window is
    ``q . height_rel[i - y + win_size - 1] + q . width_rel[j - x + win_size - 1]``.

    Args:
        block_size: query block side.
        win_size: key window side.
        dim_head: query width per head.
        scale: standard deviation of the initial embeddings.
    """

    def __init__(
        self,
        block_size: int,
        win_size: int,
        dim_head: int,
        scale: float,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.block_size = block_size
        self.win_size = win_size
        self.dim_head = dim_head
        self.scale = scale
        dd = {"device": device, "dtype": dtype}
        self.height_rel = nn.Parameter(torch.empty(win_size * 2 - 1, dim_head, **dd))
        self.width_rel = nn.Parameter(torch.empty(win_size * 2 - 1, dim_head, **dd))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.height_rel, std=self.scale)
        nn.init.normal_(self.width_rel, std=self.scale)

    def forward(self, q: Tensor) -> Tensor:
        """``q``: ``[..., block_size**2, dim_head]`` -> ``[..., block_size**2, win_size**2]``."""
        bs, win = self.block_size, self.win_size
        pos = (
            torch.arange(win, device=q.device)[None, :] - torch.arange(bs, device=q.device)[:, None]
        )
        idx = pos + (win - 1)  # [bs, win]: query offset -> row of the relative tables
        lead = q.shape[:-2]
        q = q.reshape(-1, bs, bs, self.dim_head)
        rel_h = torch.einsum("nyxd,ykd->nyxk", q, self.height_rel[idx])
        rel_w = torch.einsum("nyxd,xkd->nyxk", q, self.width_rel[idx])
        logits = rel_h[..., :, None] + rel_w[..., None, :]  # [n, y, x, win_h, win_w]
        return logits.reshape(*lead, bs * bs, win * win)


class HaloAttention(nn.Module):
    """Halo attention (HaloNet, Vaswani et al., CVPR 2021) on ``[B, dim, H, W]`` feature maps.

    Returns ``[B, dim_out, H', W']`` with ``H' = W' = H`` for ``stride=1``. Constructor
    arguments, parameter names and shapes (``q``, ``kv``, ``pos_embed.height_rel``,
    ``pos_embed.width_rel``) are those of ``timm.layers.halo_attn.HaloAttn``, and on sizes
    divisible by ``block_size`` the outputs are timm's, so a timm halo model can swap this
    module in.

    Queries come from ``block_size`` blocks, keys and values from the zero-padded window of
    side ``block_size + 2 * halo_size`` around each block. Query/key width per head is
    ``dim_head`` or ``make_divisible(dim_out * qk_ratio, 8) // num_heads``; value width is
    ``dim_out // num_heads``; the scale is ``dim_head_qk ** -0.5``. With ``stride=2`` the
    queries are subsampled by a strided 1x1 convolution (``block_size`` even) or the output
    is average-pooled (``avg_down`` or odd ``block_size``), as in timm.

    Sizes not divisible by ``block_size`` (timm asserts): the map is padded to whole blocks.
    Keys within ``halo_size`` pixels outside the image are zero vectors that take part in
    the softmax, exactly as timm's zero padding does on every border; keys that exist only
    because the last block was completed are masked out. Outputs of padded queries are
    dropped: ``H' = ceil(H / 2)`` with the strided query (that of a stride-2 1x1
    convolution) and ``floor(H / 2)`` with average pooling (that of ``AvgPool2d(2, 2)``).

    Without gradients the attention runs through :func:`core_attention.attention` (a fused
    kernel, the relative logits as additive mask). When gradients are needed it runs as one
    ``baddbmm`` and a softmax, because the fused kernels give no gradient for the mask.

    Args:
        dim: input channels.
        dim_out: output channels (default ``dim``), divisible by ``num_heads``.
        feat_size: unused, accepted for timm's self-attention layer interface.
        stride: 1 or 2.
        num_heads: attention heads.
        dim_head: query/key width per head (default from ``qk_ratio``).
        block_size: query block side.
        halo_size: halo width around each block.
        qk_ratio: query/key width relative to ``dim_out`` when ``dim_head`` is unset.
        qkv_bias: biases in the ``q`` and ``kv`` projections.
        avg_down: downsample by average pooling instead of strided queries.
        scale_pos_embed: scale the relative logits together with ``q . k``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` for :func:`core_attention.attention`
            (the relative logits are an additive mask).
    """

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        feat_size: tuple[int, int] | None = None,
        stride: int = 1,
        num_heads: int = 8,
        dim_head: int | None = None,
        block_size: int = 8,
        halo_size: int = 3,
        qk_ratio: float = 1.0,
        qkv_bias: bool = False,
        avg_down: bool = False,
        scale_pos_embed: bool = False,
        device=None,
        dtype=None,
        backend: str = "auto",
    ):
        super().__init__()
        dim_out = dim_out or dim
        if dim_out % num_heads:
            raise ValueError(f"dim_out ({dim_out}) must be divisible by num_heads ({num_heads})")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.dim_head_qk = dim_head or _make_divisible(dim_out * qk_ratio, divisor=8) // num_heads
        self.dim_head_v = dim_out // num_heads
        self.dim_out_qk = num_heads * self.dim_head_qk
        self.dim_out_v = num_heads * self.dim_head_v
        self.scale = self.dim_head_qk**-0.5
        self.scale_pos_embed = scale_pos_embed
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.block_size = self.block_size_ds = block_size
        self.halo_size = halo_size
        self.win_size = block_size + halo_size * 2
        self.block_stride = 1
        use_avg_pool = False
        if stride > 1:
            use_avg_pool = avg_down or block_size % stride != 0
            self.block_stride = 1 if use_avg_pool else stride
            self.block_size_ds = block_size // self.block_stride

        self.q = nn.Conv2d(dim, self.dim_out_qk, 1, stride=self.block_stride, bias=qkv_bias, **dd)
        self.kv = nn.Conv2d(dim, self.dim_out_qk + self.dim_out_v, 1, bias=qkv_bias, **dd)
        self.pos_embed = PosEmbedRel(
            block_size=self.block_size_ds,
            win_size=self.win_size,
            dim_head=self.dim_head_qk,
            scale=self.scale,
            **dd,
        )
        self.pool = nn.AvgPool2d(2, 2) if use_avg_pool else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.q.weight.shape[1] ** -0.5  # fan-in
        nn.init.trunc_normal_(self.q.weight, std=std)
        nn.init.trunc_normal_(self.kv.weight, std=std)
        nn.init.trunc_normal_(self.pos_embed.height_rel, std=self.scale)
        nn.init.trunc_normal_(self.pos_embed.width_rel, std=self.scale)

    def _key_mask(self, h: int, w: int, hp: int, wp: int, device) -> Tensor:
        """``[nb, win ** 2]`` bool: keys inside the image or its ``halo_size`` zero ring."""
        bs, hs, win = self.block_size, self.halo_size, self.win_size

        def axis(size: int, padded: int) -> Tensor:
            # Window t covers padded coordinates t * bs + [0, win); the zero ring ends at
            # image coordinate size + hs, i.e. padded coordinate size + 2 * hs.
            coord = torch.arange(padded // bs, device=device)[:, None] * bs
            coord = coord + torch.arange(win, device=device)[None, :]
            return coord < size + 2 * hs

        rows, cols = axis(h, hp), axis(w, wp)  # [nbh, win], [nbw, win]
        mask = rows[:, None, :, None] & cols[None, :, None, :]  # [nbh, nbw, win, win]
        return mask.reshape(-1, win * win)

    def _needs_grad(self, *tensors: Tensor) -> bool:
        if requested_backend(self.backend) == "triton":
            return False  # let core_attention.attention name what the kernel lacks
        return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[B, dim, H, W]`` -> ``[B, dim_out, H', W']``."""
        b, _, h, w = x.shape
        bs, hs, win, bsd = self.block_size, self.halo_size, self.win_size, self.block_size_ds
        pad_h, pad_w = (-h) % bs, (-w) % bs
        hp, wp = h + pad_h, w + pad_w
        nbh, nbw = hp // bs, wp // bs
        nb, heads = nbh * nbw, self.num_heads

        q = self.q(F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x)
        q = q.reshape(b * heads, self.dim_head_qk, nbh, bsd, nbw, bsd)
        q = q.permute(0, 2, 4, 3, 5, 1).reshape(b * heads, nb, bsd * bsd, self.dim_head_qk)

        # Zero padding after the projection: the halo ring holds zero keys and values.
        kv = F.pad(self.kv(x), (hs, hs + pad_w, hs, hs + pad_h))
        kv = kv.unfold(2, win, bs).unfold(3, win, bs)  # [B, C, nbh, nbw, win, win] (a view)
        # Channels are grouped per head as [k_head, v_head]; one copy lays the windows out as
        # [B * heads * nb, win ** 2, dqk + dv], and k, v are views of it.
        kv = kv.reshape(b, heads, -1, nbh, nbw, win, win).permute(0, 1, 3, 4, 5, 6, 2)
        kv = kv.reshape(b * heads * nb, win * win, -1)
        k, v = kv.split([self.dim_head_qk, self.dim_head_v], dim=-1)
        del kv

        bias = self.pos_embed(q)  # [B * heads, nb, bsd ** 2, win ** 2]
        if self.scale_pos_embed:
            bias = bias * self.scale
        if pad_h or pad_w:
            valid = self._key_mask(h, w, hp, wp, x.device)
            bias = bias.masked_fill(~valid[:, None, :], float("-inf"))
        # Every (batch, head, block) is one attention problem: fold them into the batch.
        q = q.reshape(-1, bsd * bsd, self.dim_head_qk)
        bias = bias.reshape(-1, bsd * bsd, win * win)
        if self._needs_grad(q, k, v, bias):
            # The relative logits need their gradient, which the fused kernels do not give;
            # one fused multiply-add keeps a single logits buffer alive instead of three.
            # Measured lower peak than saving strided views of the shared window buffer.
            k, v = k.contiguous(), v.contiguous()
            logits = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=self.scale)
            del bias  # only two [.., bsd^2, win^2] buffers alive at a time
            probs = logits.softmax(dim=-1)
            del logits
            out = torch.bmm(probs, v)
        else:
            out = attention(
                q[:, None],
                k[:, None],
                v[:, None],
                attn_mask=bias[:, None],
                scale=self.scale,
                backend=self.backend,
            )

        out = out.reshape(b, heads, nbh, nbw, bsd, bsd, self.dim_head_v)
        out = out.permute(0, 1, 6, 2, 4, 3, 5).reshape(b, self.dim_out_v, nbh * bsd, nbw * bsd)
        if isinstance(self.pool, nn.Identity):
            s = self.block_stride
            return out[:, :, : -(-h // s), : -(-w // s)]
        return self.pool(out[:, :, :h, :w])
