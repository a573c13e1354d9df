"""BiFormer's eager inference path (no autograd: channels-last maps, in-place residuals, MLP
over token chunks, the band pass of BiLevelRoutingAttention) against the autograd path, which
keeps the plain layer-by-layer computation."""

from __future__ import annotations

import pytest
import timm
import torch

import attn_vision  # noqa: F401  (registers the models)
import attn_vision.models.biformer as biformer_mod
import core_attention.layers._region_attention as region_mod
from attn_vision.models.biformer import BiFormer

# 7x7 routing regions as BiFormer-T, small widths; stage topks chunked (1, 2) and dense (16).
SMALL = {
    "depths": (1, 2, 2, 1),
    "embed_dims": (16, 32, 64, 128),
    "head_dim": 8,
    "n_win": 7,
    "topks": (1, 2, 16, -2),
    "num_classes": 5,
}


def _both(model: torch.nn.Module, x: torch.Tensor):
    with torch.no_grad():
        fast = model(x)
    with torch.enable_grad():
        slow = model(x).detach()
    return fast, slow


@pytest.mark.parametrize("size", [(224, 224), (112, 168), (97, 130)])
@pytest.mark.parametrize("small_chunks", [False, True])
def test_inference_path_equals_autograd_path(size, small_chunks, monkeypatch):
    if small_chunks:
        monkeypatch.setattr(biformer_mod, "_MLP_CHUNK_ELEMS", 1000)
        monkeypatch.setattr(region_mod, "_CHUNK_ELEMS", 1)
    torch.manual_seed(0)
    model = BiFormer(**SMALL).eval()
    x = torch.randn(2, 3, *size)
    fast, slow = _both(model, x)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        feats_fast = model.forward_intermediates(x, intermediates_only=True)
    feats_slow = model.forward_intermediates(x, intermediates_only=True)
    for a, b in zip(feats_fast, feats_slow, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=1e-4)


def test_inference_path_float64_and_input_untouched():
    torch.manual_seed(1)
    model = BiFormer(**SMALL).eval().double()
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    before = x.clone()
    fast, slow = _both(model, x)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    assert torch.equal(x, before)


def test_biformer_tiny_inference_equals_autograd_path():
    torch.manual_seed(2)
    model = timm.create_model("biformer_tiny", num_classes=10).eval()
    fast, slow = _both(model, torch.randn(2, 3, 224, 224))
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)


def test_train_mode_without_grad_keeps_stochastic_depth():
    """No autograd in train mode (e.g. an EMA or a probe) still runs DropPath per sample."""
    torch.manual_seed(3)
    model = BiFormer(**dict(SMALL, drop_path_rate=0.5)).train()
    x = torch.randn(4, 3, 112, 112)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert not torch.allclose(a, b)
