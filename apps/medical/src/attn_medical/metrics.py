"""Dice, IoU and HD95 per case and class with MONAI's metrics, empty masks made explicit.

* Dice and IoU (``monai.metrics.compute_dice`` / ``compute_iou``): when the ground truth
  of a class is empty the case scores 1 if the prediction is empty too, else 0
  (``ignore_empty=False``); such cases are flagged ``gt_empty`` and left out of the means,
  which are over cases with a non-empty ground truth (the figure papers report).
* HD95 (``monai.metrics.compute_hausdorff_distance`` with ``percentile=95``): the larger of
  the two directed 95th-percentile surface distances, in the units of the spacing
  (millimetres for NIfTI). It is undefined when either mask is empty: those cases carry
  ``NaN`` and a note, and are counted, not averaged.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ClassScore:
    """One case, one class."""

    case: str
    label: int
    dice: float
    iou: float
    hd95: float
    gt_voxels: int
    pred_voxels: int

    @property
    def gt_empty(self) -> bool:
        return self.gt_voxels == 0

    @property
    def note(self) -> str:
        if self.gt_empty and self.pred_voxels == 0:
            return "GT and prediction empty: Dice=IoU=1, HD95 undefined"
        if self.gt_empty:
            return "GT empty, prediction not: Dice=IoU=0, HD95 undefined"
        if self.pred_voxels == 0:
            return "prediction empty: HD95 undefined"
        return ""


def _one_hot(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    return torch.nn.functional.one_hot(t, num_classes).movedim(-1, 0)[None].float()


def score_case(
    case: str,
    pred: np.ndarray,
    gt: np.ndarray,
    num_classes: int,
    spacing: Sequence[float],
) -> list[ClassScore]:
    """Scores of classes ``1 .. num_classes - 1`` for label maps ``pred``, ``gt`` ``[*S]``."""
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou

    if pred.shape != gt.shape:
        raise ValueError(f"{case}: prediction shape {pred.shape} differs from GT {gt.shape}")
    p, g = _one_hot(pred, num_classes), _one_hot(gt, num_classes)
    dice = compute_dice(p, g, include_background=False, ignore_empty=False)[0]
    iou = compute_iou(p, g, include_background=False, ignore_empty=False)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # empty masks: NaN, handled below
        hd = compute_hausdorff_distance(
            p, g, include_background=False, percentile=95, spacing=[float(s) for s in spacing]
        )[0]
    scores = []
    for i, k in enumerate(range(1, num_classes)):
        gv, pv = int(g[0, k].sum()), int(p[0, k].sum())
        hd95 = float(hd[i]) if gv and pv else math.nan
        scores.append(ClassScore(case, k, float(dice[i]), float(iou[i]), hd95, gv, pv))
    return scores


@dataclass
class ClassSummary:
    label: int
    cases: int
    mean_dice: float
    mean_iou: float
    mean_hd95: float
    gt_empty: int
    gt_empty_predicted_empty: int
    hd95_undefined: int


def summarise(scores: list[ClassScore]) -> list[ClassSummary]:
    """Means per class over cases with a non-empty GT; empty-GT and undefined-HD95 counts."""
    out = []
    for k in sorted({s.label for s in scores}):
        mine = [s for s in scores if s.label == k]
        present = [s for s in mine if not s.gt_empty]
        defined = [s.hd95 for s in mine if not math.isnan(s.hd95)]

        def mean(values):
            return float(np.mean(values)) if len(values) else math.nan

        out.append(
            ClassSummary(
                label=k,
                cases=len(mine),
                mean_dice=mean([s.dice for s in present]),
                mean_iou=mean([s.iou for s in present]),
                mean_hd95=mean(defined),
                gt_empty=len(mine) - len(present),
                gt_empty_predicted_empty=sum(s.gt_empty and s.pred_voxels == 0 for s in mine),
                hd95_undefined=len(mine) - len(defined),
            )
        )
    return out
