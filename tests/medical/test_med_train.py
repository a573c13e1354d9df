"""``attn-medical train`` on the harness: 2D wounds reach Dice >= 0.85, 3D volumes learn.

Each run goes make-data -> train -> infer (the exported ``final/``) and is scored here
with a direct numpy Dice against the exact synthetic masks of the validation fold.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from attn_medical.cli import main


def _script(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} is not installed"
    return found


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    return 2.0 * np.logical_and(pred, gt).sum() / (pred.sum() + gt.sum())


@pytest.mark.slow
def test_wound_training_reaches_dice_085_on_validation(tmp_path):
    data, run, pred = tmp_path / "wounds", tmp_path / "run", tmp_path / "pred"
    assert main(["make-data", "wounds", "--out", str(data), "--count", "100", "--size", "64"]) == 0
    args = ["train", str(data), "--output-dir", str(run), "--channels", "8", "16", "32", "64"]
    args += ["--max-steps", "100", "--save-every", "100", "--batch-size", "8", "--lr", "3e-3"]
    assert main([*args, "--no-progress", "--seed", "0"]) == 0
    assert (run / "final" / "model.safetensors").is_file()
    val = json.loads((run / "splits.json").read_text())[0]["val"]
    assert len(val) == 20
    inputs = [str(data / "images" / f"{name}.png") for name in val]
    assert main(["infer", *inputs, "--model", str(run / "final"), "-o", str(pred)]) == 0
    scores = [
        dice(
            np.asarray(Image.open(pred / f"{name}.png")) > 0,
            np.asarray(Image.open(data / "masks" / f"{name}.png")) > 0,
        )
        for name in val
    ]
    assert np.mean(scores) >= 0.85, scores
    assert len(list((pred / "overlays").glob("*.png"))) == len(val)


@pytest.mark.slow
def test_volume_training_learns_both_structures(tmp_path):
    data, run, pred = tmp_path / "volumes", tmp_path / "run", tmp_path / "pred"
    make = ["make-data", "volumes", "--out", str(data), "--count", "10", "--test-count", "0"]
    assert main([*make, "--shape", "32", "32", "32"]) == 0
    args = ["train", str(data), "--output-dir", str(run), "--channels", "8", "16", "32"]
    args += ["--patch-size", "32", "--max-steps", "200", "--save-every", "200", "--batch-size", "2"]
    assert main([*args, "--lr", "3e-3", "--no-progress", "--seed", "0"]) == 0
    val = json.loads((run / "splits.json").read_text())[0]["val"]
    inputs = [str(data / "imagesTr" / f"{name}.nii.gz") for name in val]
    assert main(["infer", *inputs, "--model", str(run / "final"), "-o", str(pred)]) == 0
    for name in val:
        image = nib.load(data / "imagesTr" / f"{name}.nii.gz")
        mask = nib.load(pred / f"{name}.nii.gz")
        np.testing.assert_allclose(mask.affine, image.affine)
        labels = np.asarray(nib.load(data / "labelsTr" / f"{name}.nii.gz").dataobj)
        predicted = np.asarray(mask.dataobj)
        for k in (1, 2):
            # A guess with the true class frequency p scores Dice p on average.
            chance = (labels == k).mean()
            assert dice(predicted == k, labels == k) > chance + 0.5, (name, k)


@pytest.mark.slow
def test_train_skips_bad_cases_names_them_and_resumes(tmp_path, capsys):
    data, run = tmp_path / "wounds", tmp_path / "run"
    assert main(["make-data", "wounds", "--out", str(data), "--count", "8", "--size", "32"]) == 0
    (data / "images" / "wound_0001.png").write_bytes(b"\x89PNG\r\n\x1a\ncorrupt")
    Image.fromarray(np.zeros((20, 32), np.uint8)).save(data / "masks" / "wound_0002.png")
    (data / "masks" / "wound_0003.png").unlink()
    args = ["train", str(data), "--output-dir", str(run), "--channels", "4", "8", "--folds", "2"]
    args += ["--batch-size", "2", "--save-every", "2", "--no-progress", "--max-steps"]
    assert main([*args, "2"]) == 0
    err = capsys.readouterr().err
    assert f"{data / 'images' / 'wound_0001.png'}: cannot read the picture" in err
    assert f"{data / 'masks' / 'wound_0002.png'}: mask size (20, 32) does not match" in err
    assert f"{data / 'images' / 'wound_0003.png'}: no mask for this image" in err
    splits = json.loads((run / "splits.json").read_text())
    assert sorted(splits[0]["train"] + splits[0]["val"]) == [
        f"wound_{i:04d}" for i in (0, 4, 5, 6, 7)
    ]
    assert main([*args, "4"]) == 0  # --resume auto continues the run to step 4
    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert steps == ["step-00000002", "step-00000004"]
    state = json.loads((run / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["step"] == 4


@pytest.mark.slow
def test_train_runs_under_torchrun_with_two_processes(tmp_path):
    data, run = tmp_path / "wounds", tmp_path / "run"
    assert main(["make-data", "wounds", "--out", str(data), "--count", "8", "--size", "32"]) == 0
    cmd = [
        _script("torchrun"),
        "--nproc_per_node",
        "2",
        _script("attn-medical"),
        "train",
        str(data),
    ]
    cmd += ["--output-dir", str(run), "--channels", "4", "8", "--folds", "2", "--batch-size", "2"]
    cmd += ["--max-steps", "2", "--save-every", "2", "--no-progress", "--cpu"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((run / "train_config.json").read_text())["world_size"] == 2
    assert res.stdout.count("train: final model") == 1  # printed by rank 0 only
    assert (run / "final" / "model.safetensors").is_file()
