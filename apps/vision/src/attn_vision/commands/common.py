"""Options and helpers shared by the ``attn-vision`` subcommands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from timm.data import ImageNetInfo, create_transform, resolve_data_config
from torch import nn

from attn_vision.checkpoint import create_model, label_names


def add_model_arguments(parser: argparse.ArgumentParser, *, default: str = "biformer_tiny") -> None:
    parser.add_argument(
        "--model",
        default=default,
        metavar="NAME|DIR",
        help="registered timm model name (attn_vision.list_models(), or any timm model) or a "
        "folder written by 'attn-vision train' (default: %(default)s)",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        metavar="PATH",
        help="weights to load: official BiFormer .pth, .safetensors or a model folder "
        "(default: none; the model keeps its initialisation or its folder's weights)",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: %(default)s)",
    )


def add_input_size_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--img-size",
        type=int,
        default=None,
        metavar="N",
        help="square input side after resizing and cropping (default: the model's "
        "pretrained_cfg input size)",
    )


def load_model(args: argparse.Namespace, **kwargs: Any) -> nn.Module:
    model = create_model(args.model, checkpoint=args.checkpoint, **kwargs)
    return model.to(args.device).eval()


def eval_transform(model: nn.Module, img_size: int | None = None):
    """timm's evaluation transform (resize, centre crop, normalise) for ``model``."""
    overrides = {} if img_size is None else {"input_size": (3, img_size, img_size)}
    config = resolve_data_config(overrides, model=model)
    return create_transform(**config, is_training=False)


def class_names(model: nn.Module) -> list[str]:
    """The model's class names; ImageNet-1k descriptions for an unnamed 1000-class head."""
    names = label_names(model)
    if model.num_classes == 1000 and names[0] == "class_0":
        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(1000)]
    return names


def refuse_overwrite(path: Path | None, overwrite: bool) -> None:
    if path is not None and path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; add --overwrite to replace it")


def warn(message: str) -> None:
    print(f"attn-vision: {message}", file=sys.stderr)
