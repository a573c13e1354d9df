"""Attention maps are the layers' own: ``probs @ values`` rebuilds each layer's output."""

from __future__ import annotations

import pytest
import timm
import torch

from attn_vision.attention_maps import (
    attention_layers,
    attention_of,
    capture_inputs,
    default_layers,
)
from attn_vision.models.biformer import AttentionLePE
from core_attention.layers.bilevel_routing import BiLevelRoutingAttention
from core_attention.layers.halo import HaloAttention

QUERIES = [(0, 0), (4, 7), (9, 10)]


def _per_head_sum(probs, v, m):
    """``sum_tokens probs[h] * v[h]`` for heads ``h``; ``v`` is ``[H, W, m * dv]``."""
    vh = v.reshape(*v.shape[:2], m, -1)
    return torch.einsum("mhw,hwmd->md", probs, vh).reshape(-1)


def test_routing_attention_map_rebuilds_the_output():
    mod = BiLevelRoutingAttention(24, num_heads=3, n_win=3, topk=2, side_dwconv=3, auto_pad=True)
    mod = mod.double().eval()
    x = torch.randn(1, 10, 11, 24, dtype=torch.float64)
    with torch.no_grad():
        out = mod(x)[0]
        _, _, v = mod.qkv(x)
        lepe = mod.lepe(v.permute(0, 3, 1, 2))[0]
    for y, xx in QUERIES:
        qa = attention_of(mod, x, (y, xx))
        assert qa.probs.shape == (3, 10, 11)
        torch.testing.assert_close(qa.probs.sum((1, 2)), torch.ones(3, dtype=torch.float64))
        assert 1 <= len(qa.routed_regions) <= 2 and qa.query_region[2:] == (4, 4)
        rebuilt = mod.wo(_per_head_sum(qa.probs, v[0], 3) + lepe[:, y, xx])
        torch.testing.assert_close(rebuilt, out[y, xx], rtol=1e-9, atol=1e-9)


def test_global_attention_map_rebuilds_the_output():
    mod = AttentionLePE(32, num_heads=4, side_dwconv=5, backend="torch").double().eval()
    x = torch.randn(1, 5, 6, 32, dtype=torch.float64)
    with torch.no_grad():
        out = mod(x)[0]
        v = mod.qkv(x)[0].split(32, dim=-1)[2]
        lepe = mod.lepe(x.permute(0, 3, 1, 2))[0]
    for y, xx in [(0, 0), (4, 5), (2, 3)]:
        qa = attention_of(mod, x, (y, xx))
        rebuilt = mod.proj(_per_head_sum(qa.probs, v, 4) + lepe[:, y, xx])
        torch.testing.assert_close(rebuilt, out[y, xx], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("size", [(16, 16), (10, 11)])
def test_halo_attention_map_rebuilds_the_output(size):
    mod = HaloAttention(16, num_heads=2, block_size=4, halo_size=1, backend="torch")
    mod = mod.double().eval()
    x = torch.randn(1, 16, *size, dtype=torch.float64)
    with torch.no_grad():
        out = mod(x)[0]
        kv = mod.kv(x)[0]  # per head: [k (dim_head_qk), v (dim_head_v)]
        v = kv.reshape(2, mod.dim_head_qk + mod.dim_head_v, *size)[:, mod.dim_head_qk :]
        v = v.permute(2, 3, 0, 1).reshape(*size, -1)
    for y, xx in QUERIES:
        qa = attention_of(mod, x, (y, xx))
        total = qa.probs.sum((1, 2)) + qa.outside
        torch.testing.assert_close(total, torch.ones(2, dtype=torch.float64))
        mixed = _per_head_sum(qa.probs, v, 2)
        torch.testing.assert_close(mixed, out[:, y, xx], rtol=1e-9, atol=1e-9)
    corner = attention_of(mod, x, (0, 0))
    assert (corner.outside > 0).all()  # the zero keys of the halo take part, as in timm


def test_layer_discovery_and_capture():
    model = timm.create_model(
        "biformer_tiny", depths=(1, 1, 2, 1), embed_dims=(16, 32, 64, 128), head_dim=16
    ).eval()
    layers = default_layers(model)
    assert layers == [f"stages.{i}.blocks.{j}.attn" for i, j in [(0, 0), (1, 0), (2, 1), (3, 0)]]
    inputs = capture_inputs(model, torch.randn(1, 3, 70, 64), layers)
    assert inputs["stages.0.blocks.0.attn"].shape == (1, 18, 16, 16)
    halo = timm.create_model("halonet26t_core")
    names = attention_layers(halo)
    assert names and all(m.block_stride == 1 for m in names.values())
