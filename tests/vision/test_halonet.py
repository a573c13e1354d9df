"""HaloNets: timm's halo models with core_attention's HaloAttention give timm's outputs; the
paper's H0-H7 have the paper's sizes."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.layers.halo_attn import HaloAttn

import attn_vision
from attn_vision.models.halonet import HaloBottleneck, use_core_halo_attention
from core_attention.layers.halo import HaloAttention

PAPER_PARAMS = {"h0": 5.5, "h1": 8.1, "h2": 9.4, "h3": 11.8, "h4": 19.1, "h5": 30.7}
PAPER_PARAMS.update({"h6": 43.4, "h7": 67.4})
TIMM_HALO = [
    "halonet26t",
    "sehalonet33ts",
    "halonet50ts",
    "eca_halonext26ts",
    "haloregnetz_b",
    "lamhalobotnet50ts_256",
    "halo2botnet50ts_256",
]


def _randomize_norms_(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so outputs are not near zero
    (timm zero-initialises the last BN of each residual branch)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


def test_halonet26t_logits_equal_timm_with_core_attention_swapped_in():
    ref = _randomize_norms_(timm.create_model("halonet26t")).eval()
    swapped = copy.deepcopy(ref)
    assert use_core_halo_attention(swapped) == 3
    assert not any(isinstance(m, HaloAttn) for m in swapped.modules())
    assert sum(isinstance(m, HaloAttention) for m in swapped.modules()) == 3
    registered = timm.create_model("halonet26t_core").eval()
    registered.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        expected = ref(x)
        torch.testing.assert_close(swapped(x), expected, rtol=0, atol=1e-4)
        torch.testing.assert_close(registered(x), expected, rtol=0, atol=1e-4)
    assert expected.std() > 0.1


@pytest.mark.parametrize("name", ["eca_halonext26ts", "haloregnetz_b"])
def test_other_timm_halo_models_match(name):
    ref = _randomize_norms_(timm.create_model(name)).eval()
    ours = timm.create_model(f"{name}_core").eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    size = ref.pretrained_cfg["input_size"][1]
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", TIMM_HALO)
def test_core_variants_share_timm_state_dict_layout(name):
    with torch.device("meta"):
        ref = timm.create_model(name)
        ours = timm.create_model(f"{name}_core")
    a, b = ref.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    assert not any(isinstance(m, HaloAttn) for m in ours.modules())
    cfg = ours.pretrained_cfg
    assert (
        cfg["hf_hub_id"] == f"timm/{ref.pretrained_cfg['architecture']}.{ref.pretrained_cfg['tag']}"
    )
    assert cfg["crop_pct"] == ref.pretrained_cfg["crop_pct"]


@pytest.mark.parametrize("variant", sorted(PAPER_PARAMS))
def test_paper_family_parameter_counts(variant):
    with torch.device("meta"):
        model = timm.create_model(f"halonet_{variant}_core")
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - PAPER_PARAMS[variant]) / PAPER_PARAMS[variant] < 0.02


def test_paper_family_block_widths():
    with torch.device("meta"):
        h5 = timm.create_model("halonet_h5_core")
    block = h5.stages[2][0]
    assert isinstance(block, HaloBottleneck)
    attn = block.self_attn
    assert (attn.block_size, attn.halo_size, attn.num_heads) == (14, 2, 8)
    assert attn.dim_out_qk == 256 and attn.dim_out_v == 640  # rv = 2.5 on width 256
    assert block.conv3_1x1.conv.out_channels == 512  # rb = 2
    assert h5.final_conv.conv.out_channels == 1536  # df
    assert h5.pretrained_cfg["input_size"] == (3, 448, 448)


def test_h1_has_timm_halonet_h1_layout():
    with torch.device("meta"):
        ref = timm.create_model("halonet_h1")
        ours = timm.create_model("halonet_h1_core")
    a, b = ref.state_dict(), ours.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)


@pytest.mark.slow
def test_h1_outputs_equal_timm_halonet_h1_float64():
    ref = timm.create_model("halonet_h1").double().eval()
    ours = timm.create_model("halonet_h1_core").double().eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 256, 256, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("size", [(225, 301), (97, 64)])
def test_any_input_size(size):
    model = timm.create_model("halonet26t_core", num_classes=5).eval()
    with torch.no_grad():
        y = model(torch.randn(1, 3, *size))
    assert y.shape == (1, 5) and torch.isfinite(y).all()


def test_features_only():
    feat = timm.create_model("halonet26t_core", features_only=True, out_indices=(1, 2, 3, 4))
    ref = timm.create_model("halonet26t", features_only=True, out_indices=(1, 2, 3, 4))
    assert feat.feature_info.channels() == ref.feature_info.channels() == [256, 512, 1024, 2048]
    with torch.no_grad():
        outs = feat.eval()(torch.randn(1, 3, 200, 136))
    assert [o.shape[-2:] for o in outs] == [(50, 34), (25, 17), (13, 9), (7, 5)]


def test_listed():
    names = attn_vision.list_models("*halo*")
    assert {f"{n}_core" for n in TIMM_HALO} <= set(names)
    assert {f"halonet_{v}_core" for v in PAPER_PARAMS} <= set(names)
