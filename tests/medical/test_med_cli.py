"""The ``attn-medical`` commands: infer's outputs and batch errors, make-data, help."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from attn_medical.cli import main
from attn_medical.models import AttentionResUNet, AttentionResUNetConfig


def _checkpoint(path, dims, in_channels, modalities, patch):
    cfg = AttentionResUNetConfig(
        spatial_dims=dims,
        in_channels=in_channels,
        out_channels=3 if dims == 3 else 2,
        channels=(4, 8),
        preprocessing={"modalities": modalities, "patch_size": patch},
    )
    return AttentionResUNet(cfg).save_pretrained(path)


def test_infer_2d_batch_goes_on_after_a_bad_file(tmp_path, capsys):
    model = _checkpoint(tmp_path / "m", 2, 3, ["rgb"] * 3, [16, 16])
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(inputs / "a.jpg")
    Image.fromarray(rng.integers(0, 255, (13, 11), dtype=np.uint8)).save(inputs / "grey.png")
    (inputs / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    out = tmp_path / "out"
    code = main(["infer", str(inputs), "--model", str(model), "-o", str(out), "--tta"])
    assert code == 1
    captured = capsys.readouterr()
    assert f"{inputs / 'bad.png'}: cannot read the picture" in captured.err
    assert "wrote 2 mask(s)" in captured.out and "1 failed" in captured.out
    mask = np.asarray(Image.open(out / "a.png"))
    assert mask.shape == (20, 30) and set(np.unique(mask)) <= {0, 255}
    assert np.asarray(Image.open(out / "grey.png")).shape == (13, 11)
    assert np.asarray(Image.open(out / "overlays" / "a.png")).shape == (20, 30, 3)

    before = (out / "a.png").stat().st_mtime_ns
    assert main(["infer", str(inputs / "a.jpg"), "--model", str(model), "-o", str(out)]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "a.png").stat().st_mtime_ns == before
    assert (
        main(["infer", str(inputs / "a.jpg"), "-m", str(model), "-o", str(out), "--overwrite"]) == 0
    )


def test_infer_3d_keeps_geometry_and_groups_channel_files(tmp_path, capsys):
    model = _checkpoint(tmp_path / "m", 3, 2, ["CT", "MR"], [8, 8, 8])
    (tmp_path / "m" / "config.json").write_text(
        (tmp_path / "m" / "config.json")
        .read_text()
        .replace('"modalities"', '"ct_stats": [[-100.0, 200.0, 40.0, 50.0], null], "modalities"')
    )
    inputs = tmp_path / "in"
    inputs.mkdir()
    affine = np.array(
        [[0.0, 0.0, 2.5, 10.0], [0.8, 0.0, 0.0, -3.0], [0.0, 0.8, 0.0, 5.0], [0, 0, 0, 1]]
    )
    for c in range(2):
        data = np.random.default_rng(c).normal(size=(11, 19, 6)).astype(np.float32)
        nib.save(nib.Nifti1Image(data, affine), inputs / f"case_{c:04d}.nii.gz")
    out = tmp_path / "out"
    assert main(["infer", str(inputs), "--model", str(model), "-o", str(out)]) == 0
    mask = nib.load(out / "case.nii.gz")
    np.testing.assert_allclose(mask.affine, affine)
    assert mask.shape == (11, 19, 6) and mask.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}

    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.float32), affine), inputs / "odd_0000.nii.gz")
    assert main(["infer", str(inputs / "odd_0000.nii.gz"), "-m", str(model), "-o", str(out)]) == 1
    assert "1 channel(s), the model takes 2" in capsys.readouterr().err


def test_infer_names_single_channel_nnunet_files_by_case(tmp_path):
    model = _checkpoint(tmp_path / "m", 3, 1, ["MR"], [8, 8, 8])
    volume = np.random.default_rng(0).normal(size=(9, 9, 9)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "liver_7_0000.nii.gz")
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "plain.nii.gz")
    files = [str(tmp_path / "liver_7_0000.nii.gz"), str(tmp_path / "plain.nii.gz")]
    assert main(["infer", *files, "-m", str(model), "-o", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "liver_7.nii.gz",
        "plain.nii.gz",
    ]


def test_infer_reports_a_missing_checkpoint(tmp_path, capsys):
    assert (
        main(["infer", str(tmp_path), "--model", str(tmp_path / "none"), "-o", str(tmp_path / "o")])
        == 2
    )
    assert "config.json: no such file" in capsys.readouterr().out


def test_make_data_commands(tmp_path, capsys):
    assert (
        main(
            [
                "make-data",
                "wounds",
                "--out",
                str(tmp_path / "w"),
                "--count",
                "3",
                "--size",
                "24",
                "40",
            ]
        )
        == 0
    )
    sizes = {Image.open(p).size for p in (tmp_path / "w" / "images").iterdir()}
    assert all(24 <= s <= 40 for size in sizes for s in size)
    assert main(["make-data", "wounds", "--out", str(tmp_path / "w"), "--count", "3"]) == 2
    assert "--overwrite" in capsys.readouterr().out
    assert (
        main(
            [
                "make-data",
                "volumes",
                "--out",
                str(tmp_path / "v"),
                "--count",
                "2",
                "--test-count",
                "1",
                "--shape",
                "10",
                "12",
                "8",
            ]
        )
        == 0
    )
    image = nib.load(tmp_path / "v" / "imagesTr" / "vol_000.nii.gz")
    assert image.shape == (10, 12, 8)
    assert image.header.get_zooms() == pytest.approx((1.0, 1.0, 1.5))
    assert (tmp_path / "v" / "imagesTs" / "vol_002.nii.gz").is_file()


def test_help_lists_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("train", "infer", "eval", "make-data"):
        assert command in out
