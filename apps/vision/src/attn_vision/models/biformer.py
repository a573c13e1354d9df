"""BiFormer (Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing Attention",
CVPR 2023) as timm models.

A four-stage pyramid: a two-convolution stem (stride 4), three strided 3x3 convolutions
between stages, and blocks of ``x + dwconv3x3(x)`` followed by pre-norm attention and a pre-norm
MLP (NHWC inside the block). Stages 1-3 use Bi-Level Routing Attention
(:class:`core_attention.layers.bilevel_routing.BiLevelRoutingAttention`, which pads and masks
sizes not divisible by ``n_win``, so any input size works); stage 4 (``topk=-2``) uses plain
multi-head attention plus LePE.

Registered: ``biformer_tiny``, ``biformer_small``, ``biformer_base`` (13.1M / 25.5M / 56.8M
parameters). The official checkpoints (``biformer_{tiny,small,base}_in1k.pth``) load with::

    timm.create_model("biformer_tiny", pretrained=True,
                      pretrained_cfg_overlay=dict(file="biformer_tiny_in1k.pth"))

or :func:`attn_vision.checkpoint.load_checkpoint`; :func:`checkpoint_filter_fn` maps the
official parameter names (``downsample_layers.*``, ``stages.i.j.*``, ``mlp.0`` / ``mlp.3``)
to this layout (``stem``, ``stages.i.downsample``, ``stages.i.blocks.j``, ``mlp.fc1`` /
``mlp.fc2``).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from attn_vision.models._registry import register_model
from core_attention.functional import attention
from core_attention.layers.bilevel_routing import BiLevelRoutingAttention

__all__ = [
    "AttentionLePE",
    "BiFormer",
    "BiFormerBlock",
    "BiFormerStage",
    "checkpoint_filter_fn",
    "from_official_state_dict",
    "to_official_state_dict",
]

# Elements of the MLP hidden activation per band in eager inference (4 MiB in fp32).
_MLP_CHUNK_ELEMS = 1 << 20


def _inference_layout(x: Tensor) -> Tensor:
    """Channels-last NCHW in inference without autograd: the blocks' NHWC views are then
    contiguous, so LayerNorm and the projections read them without copies (same values,
    another memory layout). Converting the image makes every later stage input channels-last
    without a copy. Training keeps the default layout, whose backward pass holds less."""
    if torch.is_grad_enabled():
        return x
    return x.contiguous(memory_format=torch.channels_last)


# BiFormer's full-attention block (topk -1 / -2) takes the official default of 8 heads, not
# dim / head_dim: the released weights were trained that way.
_FULL_ATTENTION_HEADS = 8


class AttentionLePE(nn.Module):
    """Global multi-head self-attention plus a depthwise LePE of the input (BiFormer stage 4).

    ``[B, H, W, dim]`` -> ``[B, H, W, dim]``. Parameter names follow the official
    ``models/_common.py`` (``qkv`` without bias, ``proj``, ``lepe``); the LePE convolution
    runs on the block input, as there. ``side_dwconv=0`` drops it (official ``topk=-1``).
    """

    def __init__(self, dim: int, num_heads: int = 8, side_dwconv: int = 5, backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.lepe = (
            nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
            if side_dwconv > 0
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        m = self.num_heads
        q, k, v = self.qkv(x).reshape(b, h * w, 3, m, c // m).permute(2, 0, 3, 1, 4).unbind(0)
        out = attention(q, k, v, backend=self.backend)  # [B, M, HW, c / M]
        out = out.transpose(1, 2).reshape(b, h, w, c)
        if self.lepe is not None:
            out = out + self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj(out)


class BiFormerBlock(nn.Module):
    """``x + dwconv(x)``, then ``x + attn(norm1(x))`` and ``x + mlp(norm2(x))`` in NHWC.

    ``[B, C, H, W]`` -> ``[B, C, H, W]``. ``topk > 0`` selects Bi-Level Routing Attention with
    ``dim // head_dim`` heads over ``n_win x n_win`` regions; ``topk == -2`` global attention
    with LePE, ``topk == -1`` without.
    """

    def __init__(
        self,
        dim: int,
        head_dim: int = 32,
        n_win: int = 7,
        topk: int = 4,
        mlp_ratio: float = 3.0,
        side_dwconv: int = 5,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if topk > 0:
            self.attn = BiLevelRoutingAttention(
                dim,
                num_heads=dim // head_dim,
                n_win=n_win,
                qk_dim=dim,
                topk=topk,
                kv_downsample_mode="identity",
                side_dwconv=side_dwconv,
                auto_pad=True,
            )
        elif topk in (-1, -2):
            self.attn = AttentionLePE(
                dim, _FULL_ATTENTION_HEADS, side_dwconv=side_dwconv if topk == -2 else 0
            )
        else:
            raise ValueError(f"topk must be > 0, -1 or -2, got {topk}")
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.pos_embed(x)
        x = x.permute(0, 2, 3, 1)
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            x = x + self.drop_path(self.attn(self.norm1(x)))
            x = x + self.drop_path(self.mlp(self.norm2(x)))
            return x.permute(0, 3, 1, 2)
        # Eager inference: residuals are added in place and the MLP (whose hidden layer is
        # mlp_ratio times wider than the stream) runs on chunks of tokens, so its hidden
        # activation never exists for the whole map at once. Same arithmetic per token.
        x.add_(self.drop_path(self.attn(self.norm1(x))))
        hidden = self.mlp.fc1.out_features
        if x.is_contiguous() and not self.training:
            tokens = x.view(-1, x.shape[-1])
            step = max(1, _MLP_CHUNK_ELEMS // hidden)
            for t0 in range(0, tokens.shape[0], step):
                part = tokens[t0 : t0 + step]
                part.add_(self._mlp_in_place(self.norm2(part)))
        else:
            b, h, w, _ = x.shape
            rows = max(1, _MLP_CHUNK_ELEMS // max(1, b * w * hidden))
            for i in range(0, h, rows):
                band = x[:, i : i + rows]
                band.add_(self.drop_path(self.mlp(self.norm2(band))))
        return x.permute(0, 3, 1, 2)

    def _mlp_in_place(self, x: Tensor) -> Tensor:
        """timm's ``Mlp`` forward (eval, no grad) with its GELU applied in place on the
        hidden activation (exact ``nn.GELU`` semantics; other layers run as usual)."""
        mlp = self.mlp
        if not isinstance(mlp.act, nn.GELU):
            return mlp(x)
        hid = mlp.norm(mlp.drop1(torch.ops.aten.gelu_(mlp.fc1(x), approximate=mlp.act.approximate)))
        return mlp.drop2(mlp.fc2(hid))


class BiFormerStage(nn.Module):
    """Optional strided 3x3 conv + BN (``downsample``), then ``depth`` blocks. NCHW."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        downsample: bool,
        drop_path: list[float],
        **block_kwargs: Any,
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = (
            nn.Sequential(nn.Conv2d(in_dim, dim, 3, stride=2, padding=1), nn.BatchNorm2d(dim))
            if downsample
            else nn.Identity()
        )
        self.blocks = nn.Sequential(
            *[BiFormerBlock(dim, drop_path=drop_path[j], **block_kwargs) for j in range(depth)]
        )

    def forward(self, x: Tensor) -> Tensor:
        x = _inference_layout(self.downsample(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class BiFormer(nn.Module):
    """BiFormer backbone and classifier (Zhu et al., CVPR 2023).

    ``[B, in_chans, H, W]`` -> logits ``[B, num_classes]`` for any ``H, W`` (stage ``i`` sees
    ``ceil(H / 2 ** (i + 2))`` rows); ``forward_features`` returns ``[B, embed_dims[-1],
    H / 32, W / 32]`` after the final BatchNorm.

    Args:
        depths: blocks per stage.
        embed_dims: channels per stage.
        head_dim: channels per head of the routing attention (stages with ``topk > 0``).
        mlp_ratios: MLP hidden width / channels, per stage.
        n_win: regions per side for routing.
        topks: routed regions per stage; ``-2`` global attention with LePE, ``-1`` without.
        side_dwconv: LePE kernel size.
        num_classes: classifier outputs; ``0`` for none.
        in_chans: input channels.
        global_pool: ``"avg"`` or ``""`` (``forward_head`` returns the feature map).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linearly increasing over all blocks.
    """

    def __init__(
        self,
        depths: tuple[int, ...] = (2, 2, 8, 2),
        embed_dims: tuple[int, ...] = (64, 128, 256, 512),
        head_dim: int = 32,
        mlp_ratios: tuple[float, ...] = (3, 3, 3, 3),
        n_win: int = 7,
        topks: tuple[int, ...] = (1, 4, 16, -2),
        side_dwconv: int = 5,
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.drop_rate = drop_rate
        d0 = embed_dims[0]
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, d0 // 2, 3, stride=2, padding=1),
            nn.BatchNorm2d(d0 // 2),
            nn.GELU(),
            nn.Conv2d(d0 // 2, d0, 3, stride=2, padding=1),
            nn.BatchNorm2d(d0),
        )
        n_blocks = sum(depths)
        rates = [drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        stages, self.feature_info, start = [], [], 0
        for i, (depth, dim) in enumerate(zip(depths, embed_dims)):
            stages.append(
                BiFormerStage(
                    embed_dims[max(i - 1, 0)],
                    dim,
                    depth,
                    downsample=i > 0,
                    drop_path=rates[start : start + depth],
                    head_dim=head_dim,
                    n_win=n_win,
                    topk=topks[i],
                    mlp_ratio=mlp_ratios[i],
                    side_dwconv=side_dwconv,
                )
            )
            start += depth
            self.feature_info.append(
                {"num_chs": dim, "reduction": 4 * 2**i, "module": f"stages.{i}"}
            )
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(embed_dims[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {
            "stem": r"^stem",
            "blocks": r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        }

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage outputs ``[B, embed_dims[i], H / 2 ** (i + 2), W / 2 ** (i + 2)]`` (timm's
        feature API; ``norm`` applies the final BatchNorm to the last stage's output)."""
        if output_fmt != "NCHW":
            raise ValueError("output_fmt must be 'NCHW'")
        take, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        intermediates = []
        last = len(self.stages) - 1
        x = self.stem(_inference_layout(x))
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                intermediates.append(self.norm(x) if norm and i == last else x)
        if intermediates_only:
            return intermediates
        if i == last:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        take, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_norm or max_index < len(self.feature_info) - 1:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def forward_features(self, x: Tensor) -> Tensor:
        return self.norm(self.stages(self.stem(_inference_layout(x))))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean((2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# --------------------------------------------------------------------------------------------
# Official checkpoints
# --------------------------------------------------------------------------------------------

# (official pattern, this layout) pairs; the first match wins.
_OFFICIAL_TO_OURS = (
    (r"^downsample_layers\.0\.(\d+)\.", r"stem.\1."),
    (r"^downsample_layers\.(\d+)\.(\d+)\.", r"stages.\1.downsample.\2."),
    (r"^stages\.(\d+)\.(\d+)\.mlp\.0\.", r"stages.\1.blocks.\2.mlp.fc1."),
    (r"^stages\.(\d+)\.(\d+)\.mlp\.3\.", r"stages.\1.blocks.\2.mlp.fc2."),
    (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"^(norm|head)\.", r"\1."),
)
_OURS_TO_OFFICIAL = (
    (r"^stem\.(\d+)\.", r"downsample_layers.0.\1."),
    (r"^stages\.(\d+)\.downsample\.(\d+)\.", r"downsample_layers.\1.\2."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.", r"stages.\1.\2.mlp.0."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.", r"stages.\1.\2.mlp.3."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2."),
    (r"^(norm|head)\.", r"\1."),
)


def _rename(state_dict: dict[str, Tensor], rules, source: str) -> dict[str, Tensor]:
    out, unknown = {}, []
    for key, value in state_dict.items():
        for pattern, repl in rules:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"{len(unknown)} key(s) are not in the {source} BiFormer layout: {', '.join(unknown)}"
        )
    return out


def from_official_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an official BiFormer state dict (``models/biformer.py`` names) to this layout.

    Raises ``ValueError`` naming every key that is not an official BiFormer name.
    """
    return _rename(state_dict, _OFFICIAL_TO_OURS, "official")


def to_official_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`from_official_state_dict`."""
    return _rename(state_dict, _OURS_TO_OFFICIAL, "attn_vision")


def is_official_layout(state_dict: dict[str, Tensor]) -> bool:
    return any(k.startswith("downsample_layers.") for k in state_dict)


def checkpoint_filter_fn(state_dict: dict[str, Any], model: nn.Module) -> dict[str, Tensor]:
    """timm's ``pretrained_filter_fn``: unwrap ``ckpt["model"]`` (and a DDP ``module.``
    prefix) and map official names to this layout; other state dicts pass unchanged."""
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    if is_official_layout(state_dict):
        return from_official_state_dict(state_dict)
    return state_dict


# --------------------------------------------------------------------------------------------
# Registered variants
# --------------------------------------------------------------------------------------------


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # The official recipe (DeiT's): bicubic resize to 256/224 of the crop, ImageNet mean/std.
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0",
        "classifier": "head",
        "fixed_input_size": False,
        "license": "mit",
        "paper_ids": "arXiv:2303.08810",
        "paper_name": "BiFormer: Vision Transformer with Bi-Level Routing Attention",
        "origin_url": "https://github.com/rayleizhu/BiFormer",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        # Official ImageNet-1k weights: pass the downloaded .pth as pretrained_cfg_overlay["file"].
        "biformer_tiny.in1k": _cfg(),
        "biformer_small.in1k": _cfg(),
        "biformer_base.in1k": _cfg(),
    }
)

_VARIANTS = {
    "biformer_tiny": {"depths": (2, 2, 8, 2), "embed_dims": (64, 128, 256, 512)},
    "biformer_small": {"depths": (4, 4, 18, 4), "embed_dims": (64, 128, 256, 512)},
    "biformer_base": {"depths": (4, 4, 18, 4), "embed_dims": (96, 192, 384, 768)},
}


def _create_biformer(variant: str, pretrained: bool = False, **kwargs: Any) -> BiFormer:
    model_args = dict(
        _VARIANTS[variant],
        head_dim=32,
        mlp_ratios=(3, 3, 3, 3),
        n_win=7,
        topks=(1, 4, 16, -2),
        side_dwconv=5,
    )
    return build_model_with_cfg(
        BiFormer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg={"out_indices": (0, 1, 2, 3), "flatten_sequential": True},
        **dict(model_args, **kwargs),
    )


@register_model
def biformer_tiny(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    """BiFormer-T: depths (2, 2, 8, 2), dims (64, 128, 256, 512), 13.1M parameters."""
    return _create_biformer("biformer_tiny", pretrained, **kwargs)


@register_model
def biformer_small(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    """BiFormer-S: depths (4, 4, 18, 4), dims (64, 128, 256, 512), 25.5M parameters."""
    return _create_biformer("biformer_small", pretrained, **kwargs)


@register_model
def biformer_base(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    """BiFormer-B: depths (4, 4, 18, 4), dims (96, 192, 384, 768), 56.8M parameters."""
    return _create_biformer("biformer_base", pretrained, **kwargs)
