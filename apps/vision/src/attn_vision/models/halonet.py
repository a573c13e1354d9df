"""HaloNets (Vaswani et al., "Scaling Local Self-Attention for Parameter Efficient Visual
Backbones", CVPR 2021) on timm's ``ByobNet``, with core_attention's ``HaloAttention``.

Two things live here:

* The paper's family H0-H7 (``halonet_h0_core`` ... ``halonet_h7_core``): a 7x7 stem with
  max-pooling and four stages of halo bottleneck blocks with 3, 3, ``l3``, 3 blocks. Stage
  ``i`` has bottleneck (query/key) width ``w_i = (64, 128, 256, 512)[i]``, value width
  ``rv * w_i`` and output width ``rb * w_i``; the first block of stages 2-4 attends with
  stride 2; an optional final 1x1 convolution widens to ``df`` channels. Block size ``b`` and
  halo ``h`` per model:

  ======  ==  =  ====  ====  ==  ====  ======  ======
  model   b   h  rv    rb    l3  df    input   params
  ======  ==  =  ====  ====  ==  ====  ======  ======
  H0      8   3  1.0   0.5   7   -     256     5.5M
  H1      8   3  1.0   1.0   10  -     256     8.1M
  H2      8   3  1.0   1.25  11  -     256     9.4M
  H3      10  3  1.0   1.5   12  1024  320     11.8M
  H4      12  2  1.0   3.0   12  1280  384     19.1M
  H5      14  2  2.5   2.0   23  1536  448     30.7M
  H6      8   4  3.0   2.75  24  1536  512     43.4M
  H7      10  3  4.0   3.5   26  2048  600     67.4M
  ======  ==  =  ====  ====  ==  ====  ======  ======

  Every attention layer has 8 heads (as timm's ``halonet_h1``, whose layout and parameter
  names ``halonet_h1_core`` shares).

* timm's own halo models (``halonet26t``, ``sehalonet33ts``, ``halonet50ts``,
  ``eca_halonext26ts``, ``haloregnetz_b``, ``lamhalobotnet50ts_256``,
  ``halo2botnet50ts_256``) with ``HaloAttention`` in place of ``timm.layers.halo_attn.HaloAttn``,
  registered as ``<name>_core``: same configurations, same state-dict keys, same outputs,
  and ``pretrained=True`` fetches timm's weights for the original name.
  :func:`use_core_halo_attention` does the same swap on an already built model.

``HaloAttention`` pads sizes that are not multiples of the block size (timm's asserts), so
any input size works.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, make_divisible
from timm.layers.halo_attn import HaloAttn
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models.byoanet import model_cfgs as timm_byoa_cfgs
from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg, LayerFn, create_shortcut
from torch import Tensor, nn

from attn_vision.models._registry import register_model
from core_attention.layers.halo import HaloAttention

__all__ = ["HaloBottleneck", "core_model_cfg", "use_core_halo_attention"]


class HaloBottleneck(nn.Module):
    """1x1 conv -> halo attention (value width ``value_ratio`` x bottleneck) -> BN-act -> 1x1
    conv, plus a shortcut; ``[B, in_chs, H, W]`` -> ``[B, out_chs, H / stride, W / stride]``.

    With ``value_ratio=1`` the modules and parameter names are those of timm's
    ``SelfAttnBlock`` (``conv1_1x1``, ``conv2_kxk``, ``self_attn``, ``post_attn``,
    ``conv3_1x1``, ``shortcut``). Arguments as ByobNet passes them to its blocks.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        dilation: tuple[int, int] = (1, 1),
        bottle_ratio: float = 1.0,
        group_size: int | None = None,
        downsample: str = "avg",
        layers: LayerFn | None = None,
        drop_block: Any = None,
        drop_path_rate: float = 0.0,
        value_ratio: float = 1.0,
        feat_size: tuple[int, int] | None = None,
        device: Any = None,
        dtype: Any = None,
    ):
        super().__init__()
        if layers is None or layers.self_attn is None:
            raise ValueError("HaloBottleneck needs ByobNet layers with a self_attn layer")
        dd = {"device": device, "dtype": dtype}
        mid = make_divisible(out_chs * bottle_ratio)
        value = make_divisible(mid * value_ratio)
        self.shortcut = create_shortcut(
            downsample, in_chs, out_chs, stride=stride, dilation=dilation, apply_act=False,
            layers=layers, **dd,
        )  # fmt: skip
        self.conv1_1x1 = layers.conv_norm_act(in_chs, mid, 1, **dd)
        self.conv2_kxk = nn.Identity()
        self.self_attn = layers.self_attn(mid, dim_out=value, stride=stride, **dd)
        self.post_attn = layers.norm_act(value, **dd)
        self.conv3_1x1 = layers.conv_norm_act(value, out_chs, 1, apply_act=False, **dd)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.act = layers.act(inplace=True)

    def init_weights(self, zero_init_last: bool = False) -> None:
        if zero_init_last and self.shortcut is not None:
            nn.init.zeros_(self.conv3_1x1.bn.weight)
        self.self_attn.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.conv3_1x1(self.post_attn(self.self_attn(self.conv1_1x1(x))))
        x = self.drop_path(x)
        if self.shortcut is not None:
            x = x + self.shortcut(shortcut)
        return self.act(x)


# --------------------------------------------------------------------------------------------
# The paper's H0-H7
# --------------------------------------------------------------------------------------------

# name: (block b, halo h, value ratio rv, output ratio rb, stage-3 depth l3, final width df,
#        input side)
_PAPER = {
    "h0": (8, 3, 1.0, 0.5, 7, 0, 256),
    "h1": (8, 3, 1.0, 1.0, 10, 0, 256),
    "h2": (8, 3, 1.0, 1.25, 11, 0, 256),
    "h3": (10, 3, 1.0, 1.5, 12, 1024, 320),
    "h4": (12, 2, 1.0, 3.0, 12, 1280, 384),
    "h5": (14, 2, 2.5, 2.0, 23, 1536, 448),
    "h6": (8, 4, 3.0, 2.75, 24, 1536, 512),
    "h7": (10, 3, 4.0, 3.5, 26, 2048, 600),
}
_WIDTHS = (64, 128, 256, 512)


def paper_model_cfg(variant: str) -> ByoModelCfg:
    """ByobNet configuration of HaloNet-``variant`` (``"h0"`` ... ``"h7"``)."""
    b, h, rv, rb, l3, df, _ = _PAPER[variant]
    block = partial(HaloBottleneck, value_ratio=rv)
    blocks = tuple(
        ByoBlockCfg(type=block, d=d, c=round(w * rb), s=1 if i == 0 else 2, br=1 / rb)
        for i, (d, w) in enumerate(zip((3, 3, l3, 3), _WIDTHS))
    )
    return ByoModelCfg(
        blocks=blocks,
        stem_chs=64,
        stem_type="7x7",
        stem_pool="maxpool",
        num_features=df,
        self_attn_layer=HaloAttention,
        # query/key width stays the bottleneck width when the values are rv times wider
        self_attn_kwargs={"block_size": b, "halo_size": h, "qk_ratio": 1 / rv},
    )


# --------------------------------------------------------------------------------------------
# timm's halo models with core_attention's HaloAttention
# --------------------------------------------------------------------------------------------


def _swap_layer(layer: Any) -> Any:
    return HaloAttention if layer == "halo" or layer is HaloAttn else layer


def core_model_cfg(cfg: ByoModelCfg) -> ByoModelCfg:
    """``cfg`` with every halo self-attention layer (``"halo"``) made ``HaloAttention``."""

    def block(bc):
        if isinstance(bc, tuple):
            return tuple(block(b) for b in bc)
        return dataclasses.replace(bc, self_attn_layer=_swap_layer(bc.self_attn_layer))

    return dataclasses.replace(
        cfg,
        blocks=tuple(block(b) for b in cfg.blocks),
        self_attn_layer=_swap_layer(cfg.self_attn_layer),
    )


def core_halo_attention_from(layer: HaloAttn) -> HaloAttention:
    """A ``HaloAttention`` with the configuration and weights of timm's ``layer``."""
    if layer.block_stride > 1:
        stride, avg_down = layer.block_stride, False
    elif isinstance(layer.pool, nn.AvgPool2d):
        # timm pools when asked (avg_down) or when the block size is odd; both give the same
        # module, so ask for pooling explicitly.
        stride, avg_down = 2, True
    else:
        stride, avg_down = 1, False
    new = HaloAttention(
        layer.q.in_channels,
        dim_out=layer.dim_out_v,
        stride=stride,
        num_heads=layer.num_heads,
        dim_head=layer.dim_head_qk,
        block_size=layer.block_size,
        halo_size=layer.halo_size,
        qkv_bias=layer.q.bias is not None,
        avg_down=avg_down,
        scale_pos_embed=layer.scale_pos_embed,
        device=layer.q.weight.device,
        dtype=layer.q.weight.dtype,
    )
    new.load_state_dict(layer.state_dict(), strict=True)
    return new.train(layer.training)


def use_core_halo_attention(model: nn.Module) -> int:
    """Replace, in place, every timm ``HaloAttn`` inside ``model`` by an equivalent
    ``HaloAttention`` (same weights, same outputs). Returns how many were replaced."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, HaloAttn)]
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, core_halo_attention_from(layer))
    return len(targets)


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------


def _paper_cfg(side: int) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, side, side),
        "pool_size": (side // 32, side // 32),
        "crop_pct": 0.95,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv",
        "classifier": "head.fc",
        "fixed_input_size": False,
        "license": "apache-2.0",
        "paper_ids": "arXiv:2103.12731",
        "paper_name": "Scaling Local Self-Attention for Parameter Efficient Visual Backbones",
    }


_TIMM_HALO = {
    "halonet26t": ("halonet26t", "a1h_in1k"),
    "sehalonet33ts": ("sehalonet33ts", "ra2_in1k"),
    "halonet50ts": ("halonet50ts", "a1h_in1k"),
    "eca_halonext26ts": ("eca_halonext26ts", "c1_in1k"),
    "haloregnetz_b": ("haloregnetz_b", "ra3_in1k"),
    "lamhalobotnet50ts_256": ("lamhalobotnet50ts", "a1h_in1k"),
    "halo2botnet50ts_256": ("halo2botnet50ts", "a1h_in1k"),
}


def _timm_cfg(name: str, tag: str) -> dict[str, Any]:
    cfg = timm.models.get_pretrained_cfg(f"{name}.{tag}").to_dict()
    # The weights are timm's, published under the original name.
    cfg["hf_hub_id"] = f"timm/{name}.{tag}"
    cfg.pop("architecture", None)
    cfg.pop("tag", None)
    return cfg


default_cfgs = generate_default_cfgs(
    {
        **{f"halonet_{v}_core.untrained": _paper_cfg(_PAPER[v][-1]) for v in _PAPER},
        **{f"{n}_core.{tag}": _timm_cfg(n, tag) for n, (_, tag) in _TIMM_HALO.items()},
    }
)


def _create(variant: str, model_cfg: ByoModelCfg, pretrained: bool, **kwargs: Any) -> ByobNet:
    return build_model_with_cfg(
        ByobNet,
        variant,
        pretrained,
        model_cfg=model_cfg,
        feature_cfg={"flatten_sequential": True},
        **kwargs,
    )


def _paper(variant: str, pretrained: bool, **kwargs: Any) -> ByobNet:
    return _create(f"halonet_{variant}_core", paper_model_cfg(variant), pretrained, **kwargs)


def _timm(name: str, pretrained: bool, **kwargs: Any) -> ByobNet:
    cfg = core_model_cfg(timm_byoa_cfgs[_TIMM_HALO[name][0]])
    if cfg.fixed_input_size:
        kwargs.setdefault("img_size", 256)
    return _create(f"{name}_core", cfg, pretrained, **kwargs)


@register_model
def halonet_h0_core(pretrained: bool = False, **kwargs: Any) -> ByobNet:
    """HaloNet-H0 (b=8, h=3, rv=1, rb=0.5, l3=7), 5.5M parameters, 256 px."""
    return _paper("h0", pretrained, **kwargs)


@register_model
def halonet_h1_core(pretrained: bool = False, **kwargs: Any) -> ByobNet:
    """HaloNet-H1 (b=8, h=3, rv=1, rb=1, l3=10), 8.1M parameters, 256 px; timm's
    ``halonet_h1`` layout."""
    return _paper("h1", pretrained, **kwargs)


@register_model
def halonet_h2_core(pretrained: bool = False, **kwargs: Any) -> ByobNet:
    """HaloNet-H2 (b=8, h=3, rv=1, rb=1.25, l3=11), 9.4M parameters, 256 px."""
    return _paper("h2", pretrained, **kwargs)


@register_model
def halonet_h3_core(pretrained: bool = False, **kwargs: Any) -> ByobNet:
    """HaloNet-H3 (b=10, h=3, rv=1, rb=1.5, l3=12, df=1024), 11.8M parameters, 320 px."""
    return _paper("h3", pretrained, **kwargs)


@register_model
def halonet_h4_core(pretrained: bool = False, **kwargs: Any) -> ByobNet:
    """HaloNet-H4 (b=12, h=2, rv=1, rb=3, l3=12, df=1280), 19.1M parameters, 384 px."""
    return _paper("h4", pretrained, **kwargs)


@register_model
def halonet_h5_core(pretrained: bool = False, **kwargs: Any) -> ByobNet:
    """HaloNet-H5 (b=14, h=2, rv=2.5, rb=2, l3=23, df=1536), 30.7M parameters, 448 px."""
    return _paper("h5", pretrained, **kwargs)


@register_model
def halonet_h6_core(pretrained: bool = False, **kwargs: Any) -> ByobNet:
    """HaloNet-H6 (b=8, h=4, rv=3, rb=2.75, l3=24, df=1536), 43.4M parameters, 512 px."""
    return _paper("h6", pretrained, **kwargs)


@register_model
def halonet_h7_core(pretrained: bool = False, **kwargs: Any) -> ByobNet:
    """HaloNet-H7 (b=10, h=3, rv=4, rb=3.5, l3=26, df=2048), 67.4M parameters, 600 px."""
    return _paper("h7", pretrained, **kwargs)


@register_model
def halonet26t_core(pretrained: bool = False, **kwargs: Any) -> ByobNet:
    """timm's ``halonet26t`` with core_attention's HaloAttention."""
    return _timm("halonet26t", pretrained, **kwargs)


@register_model
def sehalonet33ts_core(pretrained: bool = False, **kwargs: Any) -> ByobNet:
    """timm's ``sehalonet33ts`` with core_attention's HaloAttention."""
    return _timm("sehalonet33ts", pretrained, **kwargs)


@register_model
def halonet50ts_core(pretrained: bool = False, **kwargs: Any) -> ByobNet:
    """timm's ``halonet50ts`` with core_attention's HaloAttention."""
    return _timm("halonet50ts", pretrained, **kwargs)


@register_model
def eca_halonext26ts_core(pretrained: bool = False, **kwargs: Any) -> ByobNet:
    """timm's ``eca_halonext26ts`` with core_attention's HaloAttention."""
    return _timm("eca_halonext26ts", pretrained, **kwargs)


@register_model
def haloregnetz_b_core(pretrained: bool = False, **kwargs: Any) -> ByobNet:
    """timm's ``haloregnetz_b`` with core_attention's HaloAttention."""
    return _timm("haloregnetz_b", pretrained, **kwargs)


@register_model
def lamhalobotnet50ts_256_core(pretrained: bool = False, **kwargs: Any) -> ByobNet:
    """timm's ``lamhalobotnet50ts_256`` with core_attention's HaloAttention (its lambda and
    bottleneck layers are timm's; the input size stays fixed by them)."""
    return _timm("lamhalobotnet50ts_256", pretrained, **kwargs)


@register_model
def halo2botnet50ts_256_core(pretrained: bool = False, **kwargs: Any) -> ByobNet:
    """timm's ``halo2botnet50ts_256`` with core_attention's HaloAttention (its bottleneck
    layers are timm's; the input size stays fixed by them)."""
    return _timm("halo2botnet50ts_256", pretrained, **kwargs)
