"""Normalisation per modality, training patches and the synthetic data generators."""

from __future__ import annotations

import json

import numpy as np
import pytest

from attn_medical.datasets import discover, load_cases
from attn_medical.synthetic import ellipsoid_volume, wound_image, write_volumes, write_wounds
from attn_medical.transforms import Preprocessing, ct_statistics, normalise, train_transform


def test_normalisation_per_modality_matches_direct_formulas():
    rng = np.random.default_rng(0)
    ct = rng.normal(40, 300, (5, 6, 7))
    mr = rng.gamma(2.0, 50.0, (5, 6, 7))
    image = np.stack([ct, mr]).astype(np.float32)
    lo, hi, mean, std = -200.0, 500.0, 60.0, 120.0
    prep = Preprocessing(["CT", "T2"], [4, 4, 4], [[lo, hi, mean, std], None])
    out = normalise(image, prep)
    ct_ref = (np.clip(image[0].astype(np.float64), lo, hi) - mean) / std
    mr64 = image[1].astype(np.float64)
    mr_ref = (mr64 - mr64.mean()) / mr64.std()
    np.testing.assert_allclose(out[0], ct_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1], mr_ref, rtol=1e-4, atol=1e-4)

    rgb = rng.integers(0, 256, (3, 4, 5)).astype(np.float32)
    out = normalise(rgb, Preprocessing(["rgb"] * 3, [4, 5]), max_value=255.0)
    np.testing.assert_allclose(out, rgb / 255.0, rtol=1e-6)
    with pytest.raises(ValueError, match="CT channel needs"):
        Preprocessing(["CT"], [4, 4, 4])


def test_ct_statistics_use_foreground_percentiles():
    rng = np.random.default_rng(1)
    images = [rng.normal(0, 1, (1, 20, 20, 20)) * 100 for _ in range(2)]
    labels = [np.zeros((1, 20, 20, 20), np.int64) for _ in range(2)]
    labels[0][0, 5:10, 5:10, 5:10] = 1
    labels[1][0, 2:4, 2:4, 2:4] = 2
    fg = np.concatenate([im[0][lb[0] > 0] for im, lb in zip(images, labels)])
    stats = ct_statistics(images, labels, channel=0)
    expected = [*np.percentile(fg, [0.5, 99.5]), fg.mean(), fg.std()]
    np.testing.assert_allclose(stats, expected, rtol=1e-10)


@pytest.mark.parametrize(
    ("dims", "shape", "patch"), [(2, (50, 41), (32, 32)), (3, (20, 30, 9), (16, 16, 16))]
)
def test_patches_have_the_patch_size_and_keep_labels(dims, shape, patch):
    rng = np.random.default_rng(2)
    image = rng.normal(size=(2, *shape)).astype(np.float32)
    label = np.zeros((1, *shape), np.int64)
    region = tuple(slice(s // 3, s // 3 + 3) for s in shape)
    label[(0, *region)] = 2
    t = train_transform(patch, dims, augment=True, fg_fraction=1.0)
    t.set_random_state(0)
    for _ in range(5):
        out = t({"image": image, "label": label})[0]
        assert tuple(out["image"].shape) == (2, *patch)
        assert tuple(out["label"].shape) == (1, *patch)
        values = set(np.unique(np.asarray(out["label"])).tolist())
        assert values <= {0, 2}
        assert 2 in values  # fg_fraction=1: every patch is centred on foreground


def test_wound_images_are_varied_and_exact():
    rng = np.random.default_rng(0)
    images, masks = zip(*(wound_image(rng, (48, 64)) for _ in range(8)))
    for image, mask in zip(images, masks):
        assert image.shape == (48, 64, 3) and image.dtype == np.uint8
        assert mask.shape == (48, 64) and set(np.unique(mask)) == {0, 1}
        inside = image[mask.astype(bool)].astype(float).mean(0)
        outside = image[~mask.astype(bool)].astype(float).mean(0)
        assert np.abs(inside - outside).sum() > 20  # the lesion differs from skin
    fractions = [m.mean() for m in masks]
    assert max(fractions) - min(fractions) > 0.05
    again = wound_image(np.random.default_rng(0), (48, 64))
    np.testing.assert_array_equal(again[0], images[0])


def test_make_data_layouts_are_read_back(tmp_path):
    write_wounds(tmp_path / "w", 4, (30, 40), seed=1)
    spec = discover(tmp_path / "w")
    cases, problems = load_cases(spec, spec.cases)
    assert not problems and len(cases) == 4
    assert all(30 <= c.image.spatial_shape[0] <= 40 for c in cases)
    with pytest.raises(FileExistsError):
        write_wounds(tmp_path / "w", 4, (30, 40))

    write_volumes(tmp_path / "v", 3, test_count=1, shape=(12, 14, 10), spacing=(1.0, 1.0, 2.0))
    meta = json.loads((tmp_path / "v" / "dataset.json").read_text())
    assert meta["numTraining"] == 3 and len(meta["test"]) == 1
    spec = discover(tmp_path / "v")
    assert spec.labels == {"0": "background", "1": "ellipsoid", "2": "sphere"}
    cases, problems = load_cases(spec, spec.cases)
    assert not problems and len(cases) == 3
    assert cases[0].image.spacing == (1.0, 1.0, 2.0)


def test_ellipsoid_volume_classes_have_distinct_intensity():
    image, labels = ellipsoid_volume(np.random.default_rng(3), (32, 32, 32))
    means = [image[labels == k].mean() for k in range(3)]
    assert (labels == 1).sum() > 100 and (labels == 2).sum() > 30
    assert means[1] > means[0] + 30 and means[2] < means[0] - 30
