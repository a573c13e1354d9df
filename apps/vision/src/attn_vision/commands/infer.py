"""``attn-vision infer IMAGES... --model M``: top-k classes per image as CSV or JSON."""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from attn_vision.commands.common import (
    add_input_size_argument,
    add_model_arguments,
    class_names,
    eval_transform,
    load_model,
    refuse_overwrite,
    warn,
)
from attn_vision.data import BadImageError, find_images, load_image


@dataclass
class Prediction:
    path: str
    classes: list[tuple[int, str, float]] = field(default_factory=list)
    """``(index, name, probability)``, most probable first."""


def _batches(
    paths: Sequence[Path], transform: Callable, batch_size: int, errors: list[str]
) -> Iterator[tuple[list[Path], torch.Tensor]]:
    good, tensors = [], []
    for path in paths:
        try:
            tensors.append(transform(load_image(path)))
            good.append(path)
        except BadImageError as exc:
            errors.append(str(exc))
            warn(f"skipped {exc}")
        if len(good) == batch_size:
            yield good, torch.stack(tensors)
            good, tensors = [], []
    if good:
        yield good, torch.stack(tensors)


@torch.no_grad()
def predict(
    model: nn.Module,
    paths: Sequence[Path],
    *,
    transform: Callable,
    names: Sequence[str],
    top_k: int = 5,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> tuple[list[Prediction], list[str]]:
    """Top-``top_k`` softmax classes of every readable image; unreadable ones are reported
    in the second list (``"<path>: <problem>"``) and skipped."""
    errors: list[str] = []
    out: list[Prediction] = []
    k = min(top_k, len(names))
    for batch_paths, images in _batches(paths, transform, batch_size, errors):
        probs = model(images.to(device)).float().softmax(-1).cpu()
        values, indices = probs.topk(k, dim=-1)
        for path, v, i in zip(batch_paths, values.tolist(), indices.tolist()):
            out.append(Prediction(str(path), [(c, names[c], p) for c, p in zip(i, v)]))
    return out, errors


def to_csv(predictions: Sequence[Prediction]) -> str:
    """One row per (image, rank): ``path,rank,class_index,class_name,probability``."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "rank", "class_index", "class_name", "probability"])
    for pred in predictions:
        for rank, (index, name, prob) in enumerate(pred.classes, start=1):
            writer.writerow([pred.path, rank, index, name, f"{prob:.6f}"])
    return buf.getvalue()


def to_json(predictions: Sequence[Prediction], errors: Sequence[str]) -> str:
    data = {
        "predictions": [
            {
                "path": p.path,
                "top_k": [
                    {"class_index": i, "class_name": n, "probability": round(pr, 6)}
                    for i, n, pr in p.classes
                ],
            }
            for p in predictions
        ],
        "errors": list(errors),
    }
    return json.dumps(data, indent=2) + "\n"


def run(args: argparse.Namespace) -> int:
    fmt = args.format or ("json" if args.output and args.output.suffix == ".json" else "csv")
    refuse_overwrite(args.output, args.overwrite)
    paths = find_images(args.images)
    if not paths:
        warn("no images found")
        return 1
    model = load_model(args)
    predictions, errors = predict(
        model,
        paths,
        transform=eval_transform(model, args.img_size),
        names=class_names(model),
        top_k=args.top_k,
        batch_size=args.batch_size,
        device=args.device,
    )
    text = to_json(predictions, errors) if fmt == "json" else to_csv(predictions)
    if args.output is None:
        print(text, end="")
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        warn(f"{len(predictions)} image(s) classified, {len(errors)} skipped -> {args.output}")
    return 0 if predictions else 1


def register(cli) -> None:
    p = cli.add_command("infer", "classify images: top-k classes with names as CSV or JSON")
    p.add_argument("images", nargs="+", type=Path, help="image files and/or folders (recursive)")
    add_model_arguments(p)
    add_input_size_argument(p)
    p.add_argument("--top-k", type=int, default=5, help="classes per image (default: %(default)s)")
    p.add_argument(
        "--batch-size", type=int, default=16, help="images per forward pass (default: %(default)s)"
    )
    p.add_argument("--output", type=Path, default=None, help="file to write (default: stdout)")
    p.add_argument(
        "--format",
        choices=("csv", "json"),
        default=None,
        help="output format (default: json for a .json --output, else csv)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.set_defaults(func=run)
