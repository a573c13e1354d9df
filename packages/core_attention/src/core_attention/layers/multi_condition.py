"""Multi-condition cross attention of UniVG (Ruan et al. 2024, "UniVG: Towards UNIfied-modal
Video Generation", arXiv:2401.09084).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from core_attention.functional import attention
from core_attention.layers.multi_head import head_layout

__all__ = ["MultiConditionCrossAttention"]


class MultiConditionCrossAttention(nn.Module):
    """Cross attention of one query stream to several named conditions, outputs summed.

    ``q = x W_q`` is shared; each condition ``c`` (e.g. ``"text"``, ``"image"``) has its own
    ``W_k^c``, ``W_v^c``; the output is ``W_o sum_c s_c softmax(q k_c^T * scale) v_c`` over
    the conditions present. A condition passed as ``None`` (or left out) is skipped, which is
    how classifier-free guidance drops it; with every condition absent the sum is zero and
    the output is ``W_o 0`` (the output bias). An absent condition gives the same output as a
    condition whose tokens are all masked out.

    UniVG initialises the image key/value projections from the trained text ones:
    :meth:`init_condition_from` (``init_condition_from("image", "text")``).

    Args:
        dim: channels ``C`` of ``x`` and of the output.
        condition_dims: condition name -> channels of its tokens, e.g.
            ``{"text": 1024, "image": 1024}``.
        num_heads: query heads ``H``.
        num_kv_heads: key/value heads per condition (GQA), default ``H``.
        head_dim: channels per head, default ``dim // num_heads``.
        qkv_bias: bias in the q, k, v projections.
        out_bias: bias in the output projection.
        scales: condition name -> output weight ``s_c`` (default 1.0 for every condition);
            ``forward(..., scales=...)`` overrides it per call.
        attn_drop: dropout on attention probabilities (training mode only).
        proj_drop: dropout after the output projection.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` for :func:`core_attention.attention`.

    Shapes:
        ``forward(x, conditions, *, key_lengths=None, attn_masks=None, scales=None)``:

        * ``x``: ``[B, N, C]``;
        * ``conditions``: name -> ``[B, M_c, C_c]`` or ``None``;
        * ``key_lengths``: name -> ``[B]`` integer count of valid tokens of that condition;
        * ``attn_masks``: name -> bool (``True`` = attend) or additive mask broadcastable to
          ``[B, H, N, M_c]``;
        * returns ``[B, N, C]``.
    """

    def __init__(
        self,
        dim: int,
        condition_dims: Mapping[str, int],
        num_heads: int = 8,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        out_bias: bool = True,
        scales: Mapping[str, float] | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if not condition_dims:
            raise ValueError("condition_dims needs at least one condition")
        num_kv_heads, head_dim = head_layout(dim, num_heads, num_kv_heads, head_dim)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.attn_drop = attn_drop
        self.backend = backend
        self.condition_names = tuple(condition_dims)
        self.scales = self._check_scales(dict.fromkeys(self.condition_names, 1.0), scales)

        inner_kv = num_kv_heads * head_dim
        self.q_proj = nn.Linear(dim, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.ModuleDict(
            {n: nn.Linear(d, inner_kv, bias=qkv_bias) for n, d in condition_dims.items()}
        )
        self.v_proj = nn.ModuleDict(
            {n: nn.Linear(d, inner_kv, bias=qkv_bias) for n, d in condition_dims.items()}
        )
        self.out_proj = nn.Linear(num_heads * head_dim, dim, bias=out_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def _check_names(self, what: str, mapping: Mapping | None) -> None:
        unknown = set(mapping or ()) - set(self.condition_names)
        if unknown:
            raise ValueError(
                f"{what} names unknown conditions {sorted(unknown)}; "
                f"this module has {list(self.condition_names)}"
            )

    def _check_scales(self, base: dict, scales: Mapping[str, float] | None) -> dict:
        self._check_names("scales", scales)
        return {**base, **dict(scales or {})}

    @torch.no_grad()
    def init_condition_from(self, target: str, source: str) -> None:
        """Copy the key/value projection weights of condition ``source`` into ``target``."""
        self._check_names("init_condition_from", {target: None, source: None})
        for proj in (self.k_proj, self.v_proj):
            src, dst = proj[source], proj[target]
            if src.weight.shape != dst.weight.shape:
                raise ValueError(
                    f"cannot initialise {target!r} from {source!r}: their condition dims "
                    f"differ ({dst.in_features} vs {src.in_features})"
                )
            dst.weight.copy_(src.weight)
            if dst.bias is not None:
                dst.bias.copy_(src.bias)

    def forward(
        self,
        x: torch.Tensor,
        conditions: Mapping[str, torch.Tensor | None],
        *,
        key_lengths: Mapping[str, torch.Tensor | None] | None = None,
        attn_masks: Mapping[str, torch.Tensor | None] | None = None,
        scales: Mapping[str, float] | None = None,
    ) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"x must be [B, N, C], got shape {tuple(x.shape)}")
        self._check_names("conditions", conditions)
        self._check_names("key_lengths", key_lengths)
        self._check_names("attn_masks", attn_masks)
        weights = self._check_scales(self.scales, scales)
        key_lengths = key_lengths or {}
        attn_masks = attn_masks or {}

        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        total = q.new_zeros(b, self.num_heads, n, self.head_dim)
        for name in self.condition_names:
            context = conditions.get(name)
            if context is None:
                continue
            m = context.shape[1]
            k = self.k_proj[name](context).view(b, m, self.num_kv_heads, self.head_dim)
            v = self.v_proj[name](context).view(b, m, self.num_kv_heads, self.head_dim)
            out = attention(
                q,
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=attn_masks.get(name),
                key_lengths=key_lengths.get(name),
                scale=self.scale,
                dropout_p=self.attn_drop if self.training else 0.0,
                backend=self.backend,
            )
            total = total + weights[name] * out
        total = total.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return self.proj_drop(self.out_proj(total))

    def extra_repr(self) -> str:
        return (
            f"conditions={list(self.condition_names)}, num_heads={self.num_heads}, "
            f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"backend={self.backend!r}"
        )
