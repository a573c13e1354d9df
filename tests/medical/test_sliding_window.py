"""Sliding-window inference and flip TTA against single passes and manual averages."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from attn_medical.inference import flip_combinations, predict_probabilities
from attn_medical.models import AttentionResUNet


class Pointwise(torch.nn.Module):
    """A per-voxel network: its output at a voxel depends only on that voxel's input."""

    def __init__(self, dims: int, cin: int = 2, classes: int = 3) -> None:
        super().__init__()
        conv = torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d
        self.a = conv(cin, 8, 1)
        self.b = conv(8, classes, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize(("shape", "patch"), [((37, 29, 23), (16, 16, 16)), ((45, 61), (24, 32))])
def test_sliding_window_larger_than_patch_equals_one_pass(shape, patch):
    model = Pointwise(len(shape)).eval()
    x = torch.randn(2, *shape)
    with torch.no_grad():
        one_pass = torch.softmax(model(x[None]), 1)[0]
    windowed = predict_probabilities(model, x, patch, overlap=0.5)
    assert windowed.shape == (3, *shape)
    torch.testing.assert_close(windowed, one_pass, atol=1e-5, rtol=1e-5)


def test_sliding_window_calls_every_window_at_patch_size():
    sizes = []
    model = Pointwise(3).eval()
    model.register_forward_pre_hook(lambda m, inp: sizes.append(tuple(inp[0].shape[2:])))
    predict_probabilities(model, torch.randn(2, 40, 20, 18), (16, 16, 16), sw_batch_size=1)
    assert len(sizes) > 1 and set(sizes) == {(16, 16, 16)}


def test_network_on_a_volume_that_fits_is_one_pass():
    model = AttentionResUNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8, 16))
    model.eval()
    x = torch.randn(1, 13, 17, 11)
    with torch.no_grad():
        expected = torch.softmax(model(x[None]), 1)[0]
    got = predict_probabilities(model, x, (16, 24, 16))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_flip_tta_is_the_mean_over_every_flip():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.ReLU()).eval()
    x = torch.randn(1, 9, 14)
    with torch.no_grad():
        manual = torch.zeros(3, 9, 14)
        for dims in [(), (1,), (2,), (1, 2)]:  # dims of the unbatched [C, H, W]
            flipped = torch.flip(x, dims) if dims else x
            p = torch.softmax(model(flipped[None]), 1)[0]
            manual += torch.flip(p, dims) if dims else p
    got = predict_probabilities(model, x, (16, 16), tta=True)
    torch.testing.assert_close(got, manual / 4, atol=1e-6, rtol=1e-6)
    plain = predict_probabilities(model, x, (16, 16))
    assert not torch.allclose(got, plain, atol=1e-4)  # the flips do change this model


def test_flip_combinations_cover_every_subset():
    for dims in (2, 3):
        combos = flip_combinations(dims)
        expected = {
            c for r in range(dims + 1) for c in itertools.combinations(range(2, 2 + dims), r)
        }
        assert set(combos) == expected and len(combos) == 2**dims and combos[0] == ()


def test_pointwise_tta_changes_nothing():
    model = Pointwise(3).eval()
    x = torch.randn(2, 20, 18, 17)
    a = predict_probabilities(model, x, (16, 16, 16), tta=True)
    b = predict_probabilities(model, x, (16, 16, 16))
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
