"""``attn-vision eval DATA --model M``: top-1/top-5, per-class accuracy, confusion matrix."""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from attn_vision.commands.common import (
    add_input_size_argument,
    add_model_arguments,
    class_names,
    eval_transform,
    load_model,
    refuse_overwrite,
    warn,
)
from attn_vision.data import LabeledImages, labeled_dataset


class _Tolerant(Dataset):
    """Items ``(image, label, None)``, or ``(None, label, "<path>: <problem>")``."""

    def __init__(self, dataset: LabeledImages):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            image, label = self.dataset[i]
            return image, label, None
        except Exception as exc:
            return None, self.dataset.samples[i][1], f"{self.dataset.sample_path(i)}: {exc}"


def _collate(items):
    good = [(x, y) for x, y, e in items if e is None]
    errors = [e for _, _, e in items if e is not None]
    if not good:
        return None, None, errors
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), errors


@dataclass
class EvalResult:
    top1: float
    top5: float
    confusion: np.ndarray
    """``[true, predicted]`` counts."""
    errors: list[str]

    @property
    def per_class_accuracy(self) -> np.ndarray:
        totals = self.confusion.sum(1)
        return np.divide(
            np.diag(self.confusion), totals, out=np.full(len(totals), np.nan), where=totals > 0
        )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: LabeledImages,
    *,
    num_classes: int,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> EvalResult:
    loader = DataLoader(
        _Tolerant(dataset), batch_size=batch_size, num_workers=num_workers, collate_fn=_collate
    )
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    top5_hits, seen, errors = 0, 0, []
    for images, labels, bad in tqdm(loader, desc="eval", disable=not progress):
        for e in bad:
            warn(f"skipped {e}")
        errors += bad
        if images is None:
            continue
        logits = model(images.to(device)).float().cpu()
        k = min(5, num_classes)
        topk = logits.topk(k, dim=-1).indices
        top5_hits += int((topk == labels[:, None]).any(1).sum())
        np.add.at(confusion, (labels.numpy(), topk[:, 0].numpy()), 1)
        seen += len(labels)
    if seen == 0:
        raise ValueError("no image could be evaluated")
    return EvalResult(
        top1=float(np.trace(confusion) / seen),
        top5=top5_hits / seen,
        confusion=confusion,
        errors=errors,
    )


def plot_confusion(confusion: np.ndarray, names: Sequence[str], path: Path) -> None:
    """Row-normalised confusion matrix (true class per row) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    totals = confusion.sum(1, keepdims=True)
    rates = np.divide(confusion, totals, out=np.zeros(confusion.shape), where=totals > 0)
    n = len(names)
    side = min(4 + 0.35 * n, 30)
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if n <= 40:
        ax.set_xticks(range(n), names, rotation=90)
        ax.set_yticks(range(n), names)
        if n <= 20:
            for t in range(n):
                for p in range(n):
                    if confusion[t, p]:
                        colour = "white" if rates[t, p] > 0.5 else "black"
                        ax.text(p, t, int(confusion[t, p]), ha="center", va="center", color=colour)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("confusion matrix (rows: fraction of each true class)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    out = args.output_dir
    files = [out / "metrics.json", out / "per_class.csv", out / "confusion_matrix.png"]
    for f in files:
        refuse_overwrite(f, args.overwrite)
    model = load_model(args)
    names = class_names(model)
    dataset = labeled_dataset(
        args.data, eval_transform(model, args.img_size), classes=_model_classes(model, names)
    )
    if len(dataset.classes) != model.num_classes:
        raise ValueError(
            f"{args.data} has {len(dataset.classes)} classes but the model predicts "
            f"{model.num_classes}"
        )
    result = evaluate(
        model,
        dataset,
        num_classes=model.num_classes,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        progress=args.progress,
    )
    out.mkdir(parents=True, exist_ok=True)
    metrics = {
        "top1": result.top1,
        "top5": result.top5,
        "images": int(result.confusion.sum()),
        "skipped": result.errors,
    }
    files[0].write_text(json.dumps(metrics, indent=2) + "\n")
    with files[1].open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class_index", "class_name", "images", "accuracy"])
        for i, (name, acc) in enumerate(zip(dataset.classes, result.per_class_accuracy)):
            writer.writerow([i, name, int(result.confusion[i].sum()), f"{acc:.6f}"])
    plot_confusion(result.confusion, dataset.classes, files[2])
    print(f"top-1 {result.top1:.4f}  top-5 {result.top5:.4f}  ({metrics['images']} images)")
    print(f"wrote {', '.join(str(f) for f in files)}")
    return 0


def _model_classes(model: nn.Module, names: list[str]) -> list[str] | None:
    """Class order of a model that carries its own class names; else the data's order."""
    return names if model.pretrained_cfg.get("label_names") else None


def register(cli) -> None:
    p = cli.add_command(
        "eval", "evaluate a classifier: top-1/top-5, per-class accuracy, confusion matrix PNG"
    )
    p.add_argument("data", type=Path, help="ImageFolder (ROOT/<class>/<image>) or CSV (path,label)")
    add_model_arguments(p)
    add_input_size_argument(p)
    p.add_argument(
        "--batch-size", type=int, default=32, help="images per batch (default: %(default)s)"
    )
    p.add_argument(
        "--num-workers", type=int, default=0, help="data-loading processes (default: %(default)s)"
    )
    p.add_argument(
        "--output-dir",
        type=Path,
        default=Path("eval-out"),
        help="where the results go (default: %(default)s)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace results already in --output-dir"
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show a progress bar",
    )
    p.set_defaults(func=run)
