"""``attn-medical eval PRED GT``: match predictions with ground truth and score them."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from attn_medical.io import InputError, case_name, is_supported, is_volume, read_label
from attn_medical.metrics import ClassScore, ClassSummary, score_case, summarise


def _files(path: Path) -> dict[str, Path]:
    if path.is_dir():
        return {case_name(p): p for p in sorted(path.iterdir()) if p.is_file() and is_supported(p)}
    if path.is_file():
        return {case_name(path): path}
    raise InputError(path, "no such file or folder")


def evaluate(
    pred: Path,
    gt: Path,
    *,
    num_classes: int | None = None,
    spacing: Sequence[float] | None = None,
) -> tuple[list[ClassScore], list[InputError]]:
    """Score every case present in both ``pred`` and ``gt`` (files or folders).

    Spacing comes from the ground truth's NIfTI header, or ``spacing`` (pictures; it also
    overrides NIfTI). ``num_classes`` defaults to the largest label seen plus one.
    A case that cannot be scored is returned as a problem; the others are scored.
    """
    preds, gts = _files(Path(pred)), _files(Path(gt))
    problems = [
        InputError(gts[n], "no prediction for this ground truth")
        for n in sorted(set(gts) - set(preds))
    ]
    problems += [
        InputError(preds[n], "no ground truth for this prediction")
        for n in sorted(set(preds) - set(gts))
    ]
    pairs = []
    for name in sorted(set(preds) & set(gts)):
        try:
            p, g = read_label(preds[name]), read_label(gts[name])
            if p.spatial_shape != g.spatial_shape:
                raise InputError(
                    preds[name],
                    f"size {p.spatial_shape} does not match ground truth {g.path} "
                    f"size {g.spatial_shape}",
                )
            pairs.append((name, p, g))
        except InputError as exc:
            problems.append(exc)
    if num_classes is None:
        top = max([int(max(p.array.max(), g.array.max())) for _, p, g in pairs], default=1)
        num_classes = max(top, 1) + 1
    scores: list[ClassScore] = []
    for name, p, g in pairs:
        if max(int(p.array.max()), int(g.array.max())) >= num_classes:
            problems.append(InputError(p.path, f"labels exceed --num-classes {num_classes}"))
            continue
        sp = tuple(spacing) if spacing else g.spacing
        if len(sp) != g.ndim:
            problems.append(InputError(g.path, f"--spacing needs {g.ndim} values"))
            continue
        scores += score_case(name, p.array, g.array, num_classes, sp)
    return scores, problems


def _fmt(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.4f}"


def format_report(scores: list[ClassScore], summary: list[ClassSummary], unit: str) -> str:
    lines = [f"{'case':24s} {'class':>5s} {'Dice':>7s} {'IoU':>7s} {'HD95 ' + unit:>11s}  note"]
    for s in scores:
        lines.append(
            f"{s.case:24s} {s.label:5d} {_fmt(s.dice):>7s} {_fmt(s.iou):>7s} "
            f"{_fmt(s.hd95):>11s}  {s.note}"
        )
    lines.append("")
    for c in summary:
        lines.append(
            f"class {c.label}: mean Dice {_fmt(c.mean_dice)}, IoU {_fmt(c.mean_iou)}, "
            f"HD95 {_fmt(c.mean_hd95)} {unit} over {c.cases - c.gt_empty} case(s) with "
            f"non-empty ground truth; {c.gt_empty} case(s) with empty ground truth "
            f"({c.gt_empty_predicted_empty} predicted empty); HD95 undefined in "
            f"{c.hd95_undefined}"
        )
    return "\n".join(lines)


def write_results(
    scores: list[ClassScore],
    summary: list[ClassSummary],
    csv_path: Path | None,
    json_path: Path | None,
) -> None:
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["case", "class", "dice", "iou", "hd95", "gt_voxels", "pred_voxels", "note"])
            for s in scores:
                w.writerow(
                    [s.case, s.label, s.dice, s.iou, s.hd95, s.gt_voxels, s.pred_voxels, s.note]
                )
    if json_path:

        def clean(d):
            return {
                k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()
            }

        data = {
            "cases": [clean({**asdict(s), "note": s.note}) for s in scores],
            "classes": [clean(asdict(c)) for c in summary],
        }
        Path(json_path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def run_eval(args) -> int:
    try:
        scores, problems = evaluate(
            args.pred, args.gt, num_classes=args.num_classes, spacing=args.spacing
        )
    except InputError as exc:
        print(f"error: {exc}")
        return 2
    for p in problems:
        print(f"error: {p}")
    if not scores:
        print("eval: nothing to score")
        return 1
    summary = summarise(scores)
    unit = "mm" if args.spacing or _has_volumes(Path(args.gt)) else "px"
    print(format_report(scores, summary, unit))
    write_results(scores, summary, args.csv, args.json)
    return 1 if problems else 0


def _has_volumes(path: Path) -> bool:
    return any(is_volume(p) for p in _files(path).values())
