"""``attn-vision attention-map IMAGE --model M``: PNG overlays of where query tokens attend.

BiFormer layers show the query's region (cyan), the regions it is routed to (yellow) and the
attention inside them; global and halo layers show their attention maps. Maps are
head-averaged probabilities of the chosen layers for query points given as fractions of
the image height and width.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from timm.data import resolve_data_config
from torch import nn

from attn_vision.attention_maps import (
    QueryAttention,
    attention_layers,
    attention_of,
    capture_inputs,
    default_layers,
    grid_shape,
)
from attn_vision.commands.common import (
    add_input_size_argument,
    add_model_arguments,
    class_names,
    eval_transform,
    load_model,
    refuse_overwrite,
    warn,
)
from attn_vision.data import load_image
from attn_vision.plots import attention_figure, to_display


def parse_point(text: str) -> tuple[float, float]:
    try:
        r, c = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROW,COL fractions, got {text!r}") from None
    if not (0 <= r <= 1 and 0 <= c <= 1):
        raise argparse.ArgumentTypeError(f"fractions must be in [0, 1], got {text!r}")
    return r, c


def layer_maps(
    model: nn.Module,
    images: torch.Tensor,
    layers: list[str],
    points: list[tuple[float, float]],
) -> list[tuple[str, tuple[int, int], list[QueryAttention]]]:
    """``(layer, token grid, [attention of each query point])`` for ``images[0]``."""
    modules = attention_layers(model)
    unknown = [n for n in layers if n not in modules]
    if unknown:
        raise ValueError(
            f"not attention layers with maps: {', '.join(unknown)} (choose from "
            f"{', '.join(modules)})"
        )
    inputs = capture_inputs(model, images, layers)
    rows = []
    for name in layers:
        grid = grid_shape(modules[name], inputs[name])
        queries = [
            attention_of(
                modules[name],
                inputs[name],
                (min(int(r * grid[0]), grid[0] - 1), min(int(c * grid[1]), grid[1] - 1)),
            )
            for r, c in points
        ]
        rows.append((name, grid, queries))
    return rows


def run(args: argparse.Namespace) -> int:
    output = args.output or Path(f"{args.image.stem}_attention.png")
    refuse_overwrite(output, args.overwrite)
    model = load_model(args)
    transform = eval_transform(model, args.img_size)
    x = transform(load_image(args.image))[None].to(args.device)
    layers = args.layers or default_layers(model)
    if not layers:
        raise ValueError(f"{args.model} has no attention layer with a map")
    rows = layer_maps(model, x, layers, args.points)
    with torch.no_grad():
        probs = model(x).float().softmax(-1)[0].cpu()
    p, i = probs.max(0)
    data = resolve_data_config({}, model=model)
    image = to_display(x[0], data["mean"], data["std"])
    output.parent.mkdir(parents=True, exist_ok=True)
    attention_figure(
        image,
        rows,
        output,
        suptitle=f"{args.image.name}: {class_names(model)[int(i)]} ({float(p):.0%})",
    )
    warn(f"wrote {output} ({len(layers)} layer(s) x {len(args.points)} point(s))")
    return 0


def register(cli) -> None:
    p = cli.add_command(
        "attention-map",
        "PNG overlays of routed regions (BiFormer) and attention maps for chosen layers",
    )
    p.add_argument("image", type=Path, help="image file")
    add_model_arguments(p)
    add_input_size_argument(p)
    p.add_argument(
        "--layers",
        nargs="+",
        default=None,
        metavar="NAME",
        help="attention module paths, e.g. stages.1.blocks.0.attn (default: the last "
        "attention layer of each BiFormer stage, or the last four halo layers)",
    )
    p.add_argument(
        "--points",
        nargs="+",
        type=parse_point,
        default=[(0.5, 0.5), (0.25, 0.25), (0.75, 0.7)],
        metavar="ROW,COL",
        help="query points as fractions of height and width (default: 0.5,0.5 0.25,0.25 0.75,0.7)",
    )
    p.add_argument(
        "--output", type=Path, default=None, help="PNG to write (default: <image>_attention.png)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.set_defaults(func=run)
