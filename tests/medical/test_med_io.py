"""Reading and writing: NIfTI geometry survives, pictures and masks, clear errors."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from attn_medical.datasets import discover, kfold_splits, load_case, load_cases
from attn_medical.io import InputError, read_image, read_label, write_mask


def _oblique_affine():
    """Anisotropic spacing (0.7, 1.3, 2.5) mm, a rotation about z and an origin."""
    theta = 0.3
    rot = np.array(
        [[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.7, 1.3, 2.5])
    affine[:3, 3] = [-12.5, 40.0, 7.25]
    return affine


def test_nifti_round_trip_keeps_affine_and_spacing(tmp_path):
    rng = np.random.default_rng(0)
    affine = _oblique_affine()
    volume = rng.normal(size=(9, 14, 5)).astype(np.float32)
    image = nib.Nifti1Image(volume, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=2)
    nib.save(image, tmp_path / "ct.nii.gz")

    loaded = read_image(tmp_path / "ct.nii.gz")
    assert loaded.array.shape == (1, 9, 14, 5)
    np.testing.assert_array_equal(loaded.array[0], volume)
    np.testing.assert_allclose(loaded.spacing, (0.7, 1.3, 2.5), rtol=1e-6)

    mask = (rng.random((9, 14, 5)) > 0.5).astype(np.uint8) * 2
    write_mask(mask, loaded, tmp_path / "out" / "ct.nii.gz", num_classes=3)
    back = nib.load(tmp_path / "out" / "ct.nii.gz")
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    np.testing.assert_allclose(back.header.get_zooms(), (0.7, 1.3, 2.5), rtol=1e-6)
    assert int(back.header["sform_code"]) == 2 and int(back.header["qform_code"]) == 1
    np.testing.assert_array_equal(np.asarray(back.dataobj), mask)
    assert back.get_data_dtype() == np.uint8
    relabelled = read_label(tmp_path / "out" / "ct.nii.gz")
    assert relabelled.spacing == pytest.approx(loaded.spacing)
    assert not list((tmp_path / "out").glob(".*"))  # no temporary left behind


def test_four_d_nifti_channels_come_first(tmp_path):
    data = np.stack([np.full((4, 5, 6), c, np.float32) for c in range(3)], axis=-1)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "mm.nii.gz")
    loaded = read_image(tmp_path / "mm.nii.gz")
    assert loaded.array.shape == (3, 4, 5, 6)
    assert [float(loaded.array[c].mean()) for c in range(3)] == [0.0, 1.0, 2.0]
    write_mask(np.ones((4, 5, 6), np.uint8), loaded, tmp_path / "mask.nii.gz", num_classes=2)
    mask = nib.load(tmp_path / "mask.nii.gz")
    assert mask.shape == (4, 5, 6) and int(mask.header["dim"][0]) == 3


def test_pictures_and_masks(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    loaded = read_image(tmp_path / "a.png")
    assert loaded.array.shape == (3, 17, 23) and loaded.max_value == 255
    np.testing.assert_array_equal(loaded.array.transpose(1, 2, 0), rgb)
    assert read_image(tmp_path / "rgba.png").array.shape == (3, 17, 23)
    assert read_image(tmp_path / "grey.png").array.shape == (1, 17, 23)

    binary = np.zeros((17, 23), np.uint8)
    binary[3:9, 4:12] = 255
    Image.fromarray(binary).save(tmp_path / "m.png")
    np.testing.assert_array_equal(read_label(tmp_path / "m.png").array, binary // 255)
    classes = (np.arange(17 * 23).reshape(17, 23) % 4).astype(np.uint8)
    Image.fromarray(classes).save(tmp_path / "c.png")
    np.testing.assert_array_equal(read_label(tmp_path / "c.png").array, classes)
    Image.fromarray(rgb).save(tmp_path / "colour_mask.png")
    with pytest.raises(InputError, match=r"colour_mask\.png: the mask is a colour picture"):
        read_label(tmp_path / "colour_mask.png")

    smooth = np.clip(np.arange(17 * 23).reshape(17, 23), 0, 255).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "lossy.png")
    with pytest.raises(InputError, match=r"lossy\.png: .* neither a binary 0/255 mask"):
        read_label(tmp_path / "lossy.png")

    write_mask(binary // 255, loaded, tmp_path / "o.png", num_classes=2)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o.png")), binary)
    write_mask(classes, loaded, tmp_path / "o3.png", num_classes=4)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o3.png")), classes)


def test_corrupt_files_are_named(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(InputError, match=r"broken\.png: cannot read the picture"):
        read_image(tmp_path / "broken.png")
    good = nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4))
    nib.save(good, tmp_path / "ok.nii.gz")
    data = (tmp_path / "ok.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 3])
    with pytest.raises(InputError, match=r"cut\.nii\.gz: cannot read the NIfTI file"):
        read_image(tmp_path / "cut.nii.gz")
    nan = np.zeros((4, 4, 4), np.float32)
    nan[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(InputError, match=r"nan\.nii\.gz: the volume holds NaN"):
        read_image(tmp_path / "nan.nii.gz")
    with pytest.raises(InputError, match=r"absent\.png: no such file"):
        read_image(tmp_path / "absent.png")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=r"notes\.txt: unsupported format"):
        read_image(tmp_path / "notes.txt")
    half = np.full((4, 4, 4), 0.5, np.float32)
    nib.save(nib.Nifti1Image(half, np.eye(4)), tmp_path / "half.nii.gz")
    with pytest.raises(InputError, match=r"half\.nii\.gz: the label map holds non-integer"):
        read_label(tmp_path / "half.nii.gz")


def _pictures(root, names, size=(16, 16), mask_size=None):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for name in names:
        Image.fromarray(np.full((*size, 3), 120, np.uint8)).save(root / "images" / f"{name}.jpg")
        mask = np.zeros(mask_size or size, np.uint8)
        mask[2:6, 2:6] = 255
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")


def test_2d_folder_problems_name_the_files(tmp_path):
    _pictures(tmp_path, ["a", "b", "c"])
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "images" / "lonely.png")
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(tmp_path / "masks" / "b.png")
    (tmp_path / "images" / "c.jpg").write_bytes(b"not a jpeg")
    spec = discover(tmp_path)
    assert spec.spatial_dims == 2 and spec.modalities == ["rgb"] * 3
    assert [str(p) for p in spec.problems] == [
        f"{tmp_path / 'images' / 'lonely.png'}: no mask for this image "
        f"(expected {tmp_path / 'masks' / 'lonely'}.png)"
    ]
    loaded, problems = load_cases(spec, spec.cases)
    assert [c.name for c in loaded] == ["a"]
    messages = [str(p) for p in problems]
    assert messages[0].startswith(str(tmp_path / "masks" / "b.png"))
    assert "mask size (10, 12) does not match image" in messages[0] and "(16, 16)" in messages[0]
    assert messages[1].startswith(str(tmp_path / "images" / "c.jpg"))


def test_2d_class_index_masks_set_the_classes(tmp_path):
    _pictures(tmp_path, ["a", "b"])
    classes = np.zeros((16, 16), np.uint8)
    classes[1:4, 1:4], classes[8:12, 8:12] = 1, 3
    Image.fromarray(classes).save(tmp_path / "masks" / "b.png")
    spec = discover(tmp_path)
    loaded, problems = load_cases(spec, spec.cases)
    assert not problems and spec.num_classes == 4
    assert spec.labels == {"0": "background", "1": "class 1", "2": "class 2", "3": "class 3"}
    np.testing.assert_array_equal(loaded[1].label[0], classes)


def _decathlon(root, n=3, channels=1, nnunet=False):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    training = []
    for i in range(n):
        label = np.zeros((8, 9, 10), np.uint8)
        label[2:5, 2:6, 3:7] = 1 + i % 2
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"c{i}.nii.gz")
        if nnunet:
            for c in range(channels):
                image = np.full((8, 9, 10), 10.0 * c, np.float32)
                nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"c{i}_{c:04d}.nii.gz")
        else:
            image = np.zeros((8, 9, 10), np.float32)
            nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"c{i}.nii.gz")
            training.append(
                {"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"}
            )
    if nnunet:
        meta = {
            "channel_names": {str(c): ["CT", "MR"][c] for c in range(channels)},
            "labels": {"background": 0, "liver": 1, "tumour": 2},
            "numTraining": n,
            "file_ending": ".nii.gz",
        }
    else:
        meta = {
            "modality": {"0": "CT"},
            "labels": {"0": "background", "1": "liver", "2": "tumour"},
            "training": training,
        }
    (root / "dataset.json").write_text(json.dumps(meta))


def test_decathlon_layout_and_missing_labels(tmp_path):
    _decathlon(tmp_path, n=3)
    (tmp_path / "labelsTr" / "c1.nii.gz").unlink()
    spec = discover(tmp_path)
    assert spec.spatial_dims == 3 and spec.modalities == ["CT"] and spec.num_classes == 3
    assert [c.name for c in spec.cases] == ["c0", "c2"]
    assert len(spec.problems) == 1
    assert str(spec.problems[0]).startswith(str((tmp_path / "imagesTr" / "c1.nii.gz").resolve()))
    assert "no label for this case" in str(spec.problems[0])
    case = load_case(spec.cases[0], spec)
    assert case.image.array.shape == (1, 8, 9, 10) and case.label.shape == (1, 8, 9, 10)
    assert case.image.spacing == (1.0, 1.0, 2.0)


def test_nnunet_v2_layout_groups_channel_files(tmp_path):
    _decathlon(tmp_path, n=2, channels=2, nnunet=True)
    spec = discover(tmp_path)
    assert spec.modalities == ["CT", "MR"] and spec.labels == {
        "0": "background",
        "1": "liver",
        "2": "tumour",
    }
    case = load_case(spec.cases[1], spec)
    assert case.image.array.shape == (2, 8, 9, 10)
    assert case.image.array[1].mean() == 10.0
    (tmp_path / "imagesTr" / "c0_0001.nii.gz").unlink()
    spec = discover(tmp_path)
    assert [c.name for c in spec.cases] == ["c1"]
    assert "c0_0001.nii.gz: channel file missing" in str(spec.problems[0])


def test_label_beyond_the_declared_classes_is_named(tmp_path):
    _decathlon(tmp_path, n=1)
    label = np.zeros((8, 9, 10), np.uint8)
    label[0, 0, 0] = 7
    nib.save(
        nib.Nifti1Image(label, np.diag([1.0, 1.0, 2.0, 1.0])), tmp_path / "labelsTr" / "c0.nii.gz"
    )
    spec = discover(tmp_path)
    with pytest.raises(InputError, match=r"c0\.nii\.gz: holds class 7, but the dataset has 3"):
        load_case(spec.cases[0], spec)


def test_kfold_splits_are_disjoint_and_cover_everything():
    names = [f"case{i}" for i in range(23)]
    splits = kfold_splits(names, 5, seed=3)
    vals = [set(s["val"]) for s in splits]
    assert set().union(*vals) == set(names)
    assert sum(len(v) for v in vals) == 23
    assert {len(v) for v in vals} <= {4, 5}
    for s in splits:
        assert set(s["train"]) == set(names) - set(s["val"])
    assert splits == kfold_splits(list(reversed(names)), 5, seed=3)
    assert splits != kfold_splits(names, 5, seed=4)
    with pytest.raises(ValueError, match="cannot fill"):
        kfold_splits(names[:3], 5)
