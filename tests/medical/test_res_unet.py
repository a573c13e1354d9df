"""Attention residual U-Net: the gates against the direct formula, odd sizes, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from attn_medical.models import (
    AttentionResUNet,
    AttentionResUNetConfig,
    CheckpointError,
    load_pretrained,
)


def _conv1x1(branch, t):
    """A 1x1(x1) convolution (+ optional eval-mode batch norm) written out in float64."""
    conv = branch[0].conv
    w = conv.weight.double().flatten(1)  # [out, in]
    out = torch.einsum("oi,bi...->bo...", w, t) + conv.bias.double().view(
        1, -1, *[1] * (t.dim() - 2)
    )
    if len(branch) > 1 and isinstance(branch[1], torch.nn.modules.batchnorm._BatchNorm):
        bn = branch[1]
        shape = (1, -1, *[1] * (t.dim() - 2))
        out = (out - bn.running_mean.double().view(shape)) / torch.sqrt(
            bn.running_var.double().view(shape) + bn.eps
        ) * bn.weight.double().view(shape) + bn.bias.double().view(shape)
    return out


def gate_reference(gate, g, x):
    """Oktay et al. 2018: alpha = sigmoid(psi(relu(W_x x + up(W_g g)))), out = x * alpha."""
    g, x = g.double(), x.double()
    mode = "bilinear" if x.dim() == 4 else "trilinear"
    wg = F.interpolate(_conv1x1(gate.W_g, g), size=x.shape[2:], mode=mode, align_corners=False)
    q = torch.relu(_conv1x1(gate.W_x, x) + wg)
    alpha = torch.sigmoid(_conv1x1(gate.psi, q))
    return x * alpha, alpha


@pytest.mark.parametrize(
    ("dims", "norm", "size"),
    [(2, "instance", (37, 53)), (2, "batch", (29, 30)), (3, "instance", (11, 18, 21))],
)
def test_every_gate_matches_the_direct_formula(dims, norm, size):
    model = AttentionResUNet(
        spatial_dims=dims, in_channels=2, out_channels=3, channels=(4, 8, 16), norm=norm
    )
    for module in model.modules():  # non-trivial batch-norm statistics
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    model.eval()
    seen = []

    def hook(gate, inputs, output):
        g, x = inputs[:2]
        expected, alpha_ref = gate_reference(gate, g, x)
        out, alpha = output
        seen.append(
            (
                (out.double() - expected).abs().max().item(),
                (alpha.double() - alpha_ref).abs().max().item(),
                g.shape[2:] != x.shape[2:],
            )
        )

    handles = [d.gate.register_forward_hook(hook) for d in model.decoders]
    x = torch.randn(2, 2, *size)
    with torch.no_grad():
        _, maps = model(x, return_attention=True)
    for h in handles:
        h.remove()
    assert len(seen) == 2
    for out_err, alpha_err, coarser in seen:
        assert out_err < 1e-5 and alpha_err < 1e-5
        assert coarser  # the gating signal comes from the coarser level
    assert maps[0].shape == (2, 1, *size)
    assert ((maps[0] >= 0) & (maps[0] <= 1)).all()


@pytest.mark.parametrize(
    ("dims", "size", "strides"),
    [
        (2, (37, 53), (2, 2, 2)),
        (2, (5, 9), (2, 2, 2)),
        (3, (13, 19, 23), ((1, 2, 2), 2, 2)),
        (3, (7, 8, 9), (2, 2, 2)),
    ],
)
def test_forward_any_size_and_deep_supervision(dims, size, strides):
    model = AttentionResUNet(
        spatial_dims=dims,
        in_channels=1,
        out_channels=3,
        channels=(4, 8, 8, 16),
        strides=strides,
        deep_supervision=True,
    )
    x = torch.randn(2, 1, *size)
    model.train()
    outs = model(x)
    assert outs[0].shape == (2, 3, *size)
    cum = [1] * dims
    for level, aux in enumerate(outs[1:], start=1):
        s = model.config.stride_per_axis(level - 1)
        cum = [c * k for c, k in zip(cum, s)]
        assert aux.shape == (2, 3, *[-(-n // c) for n, c in zip(size, cum)])
    loss = sum(o.square().mean() for o in outs)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing, f"parameters without gradient: {missing}"
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, *size)
    assert torch.isfinite(out).all()


def test_odd_sizes_are_zero_padded_at_the_ends_and_cropped_back():
    """An odd-size input is the padded input cropped: zero-padding, then crop back."""
    model = AttentionResUNet(spatial_dims=2, in_channels=1, channels=(4, 8), strides=(4,)).eval()
    x = torch.randn(1, 1, 13, 10)
    padded = F.pad(x, (0, 2, 0, 3))  # to multiples of 4, at the ends
    with torch.no_grad():
        assert torch.allclose(model(x), model(padded)[:, :, :13, :10], atol=1e-6)


def test_save_and_load_round_trip(tmp_path):
    cfg = AttentionResUNetConfig(
        spatial_dims=3,
        in_channels=2,
        out_channels=3,
        channels=(4, 8, 16),
        strides=((1, 2, 2), 2),
        norm="batch",
        labels={"0": "background", "1": "a", "2": "b"},
        preprocessing={"modalities": ["CT", "MR"], "patch_size": [8, 16, 16]},
    )
    model = AttentionResUNet(cfg).eval()
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    loaded = AttentionResUNet.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config == cfg
    x = torch.randn(1, 2, 6, 14, 15)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    with pytest.raises(FileExistsError):
        model.save_pretrained(tmp_path / "ckpt")


def test_strict_loading_names_every_bad_key(tmp_path):
    from safetensors.torch import load_file, save_file

    model = AttentionResUNet(spatial_dims=2, channels=(4, 8))
    folder = model.save_pretrained(tmp_path / "m")
    state = load_file(str(folder / "model.safetensors"))
    del state["head.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["encoders.0.0.conv1.weight"] = torch.zeros(1, 1, 3, 3)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_pretrained(folder)
    msg = str(err.value)
    assert "head.weight" in msg and "extra.weight" in msg and "encoders.0.0.conv1.weight" in msg
    assert "missing" in msg and "unexpected" in msg and "shape" in msg


def test_bad_config_and_weights_are_named(tmp_path):
    model = AttentionResUNet(spatial_dims=2, channels=(4, 8))
    folder = model.save_pretrained(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "widht": 3}))
    with pytest.raises(CheckpointError, match="widht"):
        load_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_pretrained(folder)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"channels": (8,)}, "at least 2"),
        ({"channels": (8, 16), "strides": (2, 2)}, "strides needs 1"),
        ({"spatial_dims": 3, "channels": (8, 16), "strides": ((1, 2),)}, "needs 3 entries"),
        ({"norm": "layer"}, "norm must be"),
        ({"out_channels": 1}, "background"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AttentionResUNetConfig(**kwargs)
