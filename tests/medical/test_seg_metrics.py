"""Dice, IoU and HD95 against direct float64 formulas; empty masks; the eval command."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from attn_medical.cli import main
from attn_medical.metrics import score_case, summarise


def _surface(mask):
    return np.argwhere(mask & ~ndimage.binary_erosion(mask, border_value=0)).astype(np.float64)


def hd95_reference(pred, gt, spacing):
    """max of the two directed 95th-percentile surface distances, brute force in mm."""
    a = _surface(pred) * np.asarray(spacing)
    b = _surface(gt) * np.asarray(spacing)
    d = cdist(a, b)
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def _blob(shape, centre, radii):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return (((grid - centre) / radii) ** 2).sum(-1) < 1


@pytest.mark.parametrize(
    ("shape", "spacing"),
    [((40, 33), (1.0, 1.0)), ((40, 33), (0.5, 2.0)), ((21, 18, 13), (0.8, 1.1, 3.0))],
)
def test_scores_match_direct_formulas(shape, spacing):
    rng = np.random.default_rng(len(shape))
    dims = len(shape)
    gt = np.zeros(shape, np.int64)
    pred = np.zeros(shape, np.int64)
    centre = np.asarray(shape) / 2
    gt[_blob(shape, centre, np.asarray(shape) / 4)] = 1
    pred[_blob(shape, centre + rng.uniform(-2, 2, dims), np.asarray(shape) / 4.5)] = 1
    gt[_blob(shape, centre / 2, np.full(dims, 2.5))] = 2
    pred[_blob(shape, centre / 2 + 1, np.full(dims, 3.0))] = 2
    scores = score_case("c", pred, gt, 3, spacing)
    assert [s.label for s in scores] == [1, 2]
    for s in scores:
        p, g = pred == s.label, gt == s.label
        inter = np.logical_and(p, g).sum()
        assert s.dice == pytest.approx(2 * inter / (p.sum() + g.sum()), rel=1e-6)
        assert s.iou == pytest.approx(inter / np.logical_or(p, g).sum(), rel=1e-6)
        assert s.hd95 == pytest.approx(hd95_reference(p, g, spacing), rel=1e-4, abs=1e-4)
        assert s.gt_voxels == g.sum() and s.pred_voxels == p.sum() and s.note == ""


def test_empty_masks_are_explicit():
    gt = np.zeros((10, 10), np.int64)
    pred = np.zeros((10, 10), np.int64)
    both_empty = score_case("a", pred, gt, 2, (1.0, 1.0))[0]
    assert both_empty.dice == 1.0 and both_empty.iou == 1.0 and math.isnan(both_empty.hd95)
    assert "GT and prediction empty" in both_empty.note
    pred[2:4, 2:4] = 1
    false_alarm = score_case("b", pred, gt, 2, (1.0, 1.0))[0]
    assert false_alarm.dice == 0.0 and math.isnan(false_alarm.hd95)
    assert "GT empty, prediction not" in false_alarm.note
    missed = score_case("c", gt, pred, 2, (1.0, 1.0))[0]
    assert missed.dice == 0.0 and math.isnan(missed.hd95) and "prediction empty" in missed.note
    hit = score_case("d", pred, pred, 2, (1.0, 1.0))[0]
    (summary,) = summarise([both_empty, false_alarm, missed, hit])
    assert summary.cases == 4 and summary.gt_empty == 2 and summary.gt_empty_predicted_empty == 1
    assert summary.mean_dice == pytest.approx(0.5)  # missed (0) and hit (1); empty GT left out
    assert summary.hd95_undefined == 3 and summary.mean_hd95 == 0.0


def _save(path, data, spacing):
    nib.save(nib.Nifti1Image(data.astype(np.uint8), np.diag([*spacing, 1.0])), path)


def test_eval_command_uses_the_nifti_spacing(tmp_path, capsys):
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    spacing = (0.5, 0.5, 4.0)
    shape = (30, 30, 12)
    gt = _blob(shape, np.array([15, 15, 6]), np.array([8, 8, 4]))
    pred = _blob(shape, np.array([16, 15, 7]), np.array([8, 7, 4]))
    _save(tmp_path / "gt" / "p1.nii.gz", gt, spacing)
    _save(tmp_path / "pred" / "p1.nii.gz", pred, spacing)
    _save(tmp_path / "gt" / "p2.nii.gz", np.zeros(shape), spacing)
    _save(tmp_path / "pred" / "p2.nii.gz", np.zeros(shape), spacing)
    _save(tmp_path / "gt" / "p3.nii.gz", gt, spacing)  # no prediction
    code = main(
        [
            "eval",
            str(tmp_path / "pred"),
            str(tmp_path / "gt"),
            "--json",
            str(tmp_path / "m.json"),
            "--csv",
            str(tmp_path / "m.csv"),
        ]
    )
    assert code == 1  # p3 has no prediction: scored the rest, reported the problem
    out = capsys.readouterr().out
    assert f"{tmp_path / 'gt' / 'p3.nii.gz'}: no prediction" in out
    assert "GT and prediction empty" in out and "mm" in out
    data = json.loads((tmp_path / "m.json").read_text())
    p1 = next(c for c in data["cases"] if c["case"] == "p1")
    assert p1["hd95"] == pytest.approx(hd95_reference(pred, gt, spacing), rel=1e-4)
    assert p1["hd95"] != pytest.approx(hd95_reference(pred, gt, (1, 1, 1)), rel=1e-2)
    p2 = next(c for c in data["cases"] if c["case"] == "p2")
    assert p2["dice"] == 1.0 and p2["hd95"] is None
    assert data["classes"][0]["gt_empty"] == 1
    assert (tmp_path / "m.csv").read_text().count("\n") == 3


def test_eval_rejects_mismatched_sizes(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(tmp_path / "p" / "x.png")
    Image.fromarray(np.zeros((10, 13), np.uint8)).save(tmp_path / "g" / "x.png")
    assert main(["eval", str(tmp_path / "p"), str(tmp_path / "g")]) == 1
    out = capsys.readouterr().out
    assert f"{tmp_path / 'p' / 'x.png'}: size (10, 12) does not match ground truth" in out
    assert main(["eval", str(tmp_path / "p"), str(tmp_path / "missing")]) == 2
    assert f"{tmp_path / 'missing'}: no such file or folder" in capsys.readouterr().out
