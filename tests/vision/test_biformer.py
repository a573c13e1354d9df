"""BiFormer: paper sizes, official checkpoint layout and outputs, timm integration, any size."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import timm
import torch

import attn_vision
from attn_vision.checkpoint import StateDictMismatchError, load_checkpoint
from attn_vision.models.biformer import (
    BiFormer,
    from_official_state_dict,
    to_official_state_dict,
)

# A BiFormer small enough for float64 checks: 4x4 routing regions, so 128 x 128 inputs give
# stage sizes 32, 16, 8, 4, divisible by the grid as the official code requires.
_DEPTHS, _DIMS, _TOPKS = (1, 1, 2, 1), (16, 32, 64, 128), (1, 2, 4, -2)
SMALL = {"depths": _DEPTHS, "embed_dims": _DIMS, "topks": _TOPKS, "head_dim": 8, "n_win": 4}
SMALL_OFFICIAL = {"depth": _DEPTHS, "embed_dim": _DIMS, "topks": _TOPKS, "head_dim": 8, "n_win": 4}
SMALL["num_classes"] = SMALL_OFFICIAL["num_classes"] = 7
PAPER = {
    "biformer_tiny": (13.1e6, {"depth": (2, 2, 8, 2), "embed_dim": (64, 128, 256, 512)}),
    "biformer_small": (25.5e6, {"depth": (4, 4, 18, 4), "embed_dim": (64, 128, 256, 512)}),
    "biformer_base": (56.8e6, {"depth": (4, 4, 18, 4), "embed_dim": (96, 192, 384, 768)}),
}


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PAPER))
def test_parameter_count_matches_the_paper(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert abs(_params(model) - PAPER[name][0]) / PAPER[name][0] < 0.02


@pytest.mark.parametrize("name", sorted(PAPER))
def test_official_key_layout_maps_one_to_one(name, refs):
    with torch.device("meta"):
        ours = timm.create_model(name)
        official = refs.OfficialBiFormer(**PAPER[name][1])
    official_sd = official.state_dict()
    mapped = from_official_state_dict(official_sd)
    ours_sd = ours.state_dict()
    assert sorted(mapped) == sorted(ours_sd)
    assert all(mapped[k].shape == ours_sd[k].shape for k in ours_sd)
    assert sorted(to_official_state_dict(ours_sd)) == sorted(official_sd)


def test_outputs_equal_the_official_forward_float64(refs):
    official = refs.randomize_(refs.OfficialBiFormer(**SMALL_OFFICIAL)).double().eval()
    ours = BiFormer(**SMALL).double().eval()
    ours.load_state_dict(from_official_state_dict(official.state_dict()), strict=True)
    x = torch.randn(2, 3, 128, 128, dtype=torch.float64)
    with torch.no_grad():
        expected = official(x)
        got = ours(x)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def _official_file(tmp_path, official, **extra):
    path = tmp_path / "biformer_official.pth"
    torch.save({"model": official.state_dict(), **extra}, path)
    return path


def test_official_checkpoint_file_loads_strictly(tmp_path, refs):
    official = refs.randomize_(refs.OfficialBiFormer(**SMALL_OFFICIAL)).eval()
    # Training scripts store their argparse namespace beside the weights.
    path = _official_file(tmp_path, official, args=argparse.Namespace(lr=1e-3), epoch=299)
    ours = BiFormer(**SMALL).eval()
    report = load_checkpoint(ours, path)
    assert report.loaded == len(ours.state_dict())
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), official(x), rtol=1e-4, atol=1e-4)


def test_wrong_architecture_checkpoint_names_the_keys(tmp_path, refs):
    bigger = dict(SMALL_OFFICIAL, depth=(1, 1, 3, 1))
    path = _official_file(tmp_path, refs.OfficialBiFormer(**bigger))
    with pytest.raises(
        StateDictMismatchError, match=r"stages\.2\.blocks\.2\.attn\.qkv\.qkv\.weight"
    ):
        load_checkpoint(BiFormer(**SMALL), path)
    wider = dict(SMALL_OFFICIAL, embed_dim=(16, 32, 64, 256))
    path = _official_file(tmp_path, refs.OfficialBiFormer(**wider))
    with pytest.raises(StateDictMismatchError, match=r"stages\.3\.blocks\.0\.norm1\.weight"):
        load_checkpoint(BiFormer(**SMALL), path)


def test_foreign_keys_are_named():
    sd = {"downsample_layers.0.0.weight": torch.zeros(1), "blocks.0.conv.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"blocks\.0\.conv\.weight"):
        from_official_state_dict(sd)


def test_new_head_keeps_backbone_and_replaces_classifier(tmp_path, refs):
    official = refs.randomize_(refs.OfficialBiFormer(**SMALL_OFFICIAL))
    path = _official_file(tmp_path, official)
    model = BiFormer(**dict(SMALL, num_classes=3))
    model.pretrained_cfg = {"classifier": "head"}
    report = load_checkpoint(model, path, new_head=True)
    assert sorted(report.skipped) == ["head.bias", "head.weight"]
    torch.testing.assert_close(model.norm.weight, official.norm.weight)


@pytest.mark.slow
def test_timm_pretrained_file_path_matches_official_biformer_tiny(tmp_path, refs):
    official = refs.randomize_(refs.OfficialBiFormer()).eval()
    path = _official_file(tmp_path, official)
    model = timm.create_model(
        "biformer_tiny", pretrained=True, pretrained_cfg_overlay={"file": str(path)}
    ).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official(x), rtol=1e-4, atol=1e-4)


def test_registered_names_do_not_shadow_timm():
    code = "import timm, json; print(json.dumps(timm.list_models()))"  # without attn_vision
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    timm_names = set(__import__("json").loads(out.stdout))
    ours = attn_vision.list_models()
    assert {"biformer_tiny", "biformer_small", "biformer_base"} <= set(ours)
    assert not (set(ours) & timm_names)
    assert set(ours) <= set(timm.list_models())
    assert attn_vision.list_models("biformer_*") == [
        "biformer_base",
        "biformer_small",
        "biformer_tiny",
    ]


def test_timm_keywords_and_pretrained_cfg():
    model = timm.create_model(
        "biformer_tiny",
        pretrained=False,
        pretrained_cfg=None,
        pretrained_cfg_overlay={"crop_pct": 1.0},
        cache_dir="/nonexistent",
        num_classes=5,
        in_chans=1,
        drop_rate=0.1,
        drop_path_rate=0.2,
        drop_block_rate=None,
    )
    cfg = model.pretrained_cfg
    assert cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["input_size"] == (3, 224, 224)
    assert model.head.out_features == 5 and model.stem[0].in_channels == 1
    data = timm.data.resolve_data_config({}, model=timm.create_model("biformer_small"))
    assert data["crop_pct"] == 0.875 and data["input_size"] == (3, 224, 224)


@pytest.mark.parametrize("size", [(225, 225), (97, 130), (513, 513)])
def test_any_input_size(size):
    model = BiFormer(**SMALL).eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        y = model(x)
        feats = model.forward_intermediates(x, intermediates_only=True)
    assert y.shape == (1, 7) and torch.isfinite(y).all()
    h, w = size
    for i, f in enumerate(feats):
        s = 2 ** (i + 2)
        assert f.shape[-2:] == (-(-h // s), -(-w // s))


def test_features_only_and_forward_intermediates_agree():
    torch.manual_seed(1)
    model = timm.create_model("biformer_tiny", depths=(1, 1, 1, 1)).eval()
    torch.manual_seed(1)  # same initialisation: the feature wrapper renames the modules
    feat = timm.create_model("biformer_tiny", depths=(1, 1, 1, 1), features_only=True).eval()
    torch.testing.assert_close(
        feat.stages_3.blocks[0].mlp.fc2.weight, model.stages[3].blocks[0].mlp.fc2.weight
    )
    assert feat.feature_info.channels() == [64, 128, 256, 512]
    assert feat.feature_info.reduction() == [4, 8, 16, 32]
    x = torch.randn(1, 3, 100, 90)
    with torch.no_grad():
        a = feat(x)
        b = model.forward_intermediates(x, intermediates_only=True)
    for fa, fb in zip(a, b, strict=True):
        torch.testing.assert_close(fa, fb)
    sub = timm.create_model(
        "biformer_tiny", depths=(1, 1, 1, 1), features_only=True, out_indices=(2,)
    )
    assert sub.feature_info.channels() == [256]


def test_backward_and_grad_checkpointing_agree():
    model = BiFormer(**dict(SMALL, drop_path_rate=0.0)).double()
    x = torch.randn(2, 3, 64, 57, dtype=torch.float64)
    model(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert grads["stages.0.blocks.0.attn.qkv.qkv.weight"].abs().sum() > 0
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-9, atol=1e-12)
