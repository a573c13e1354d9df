"""``save_pretrained`` / ``from_pretrained``: a folder with ``model.safetensors`` + ``config.json``.

Loading is strict: every missing key, unexpected key and shape mismatch is named in one
error. Nothing is unpickled (safetensors holds tensors only).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from attn_medical.models.config import AttentionResUNetConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint folder that does not fit the model it describes."""


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_pretrained(model, directory: str | Path, overwrite: bool = False) -> Path:
    """Write ``model`` (an :class:`AttentionResUNet`) to ``directory``; returns it.

    Refuses to replace an existing checkpoint unless ``overwrite``. Each file is written
    under a temporary name and renamed into place.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    if (directory / WEIGHTS_NAME).exists() and not overwrite:
        raise FileExistsError(f"{directory / WEIGHTS_NAME} exists; pass overwrite=True")
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, str(p)))
    text = json.dumps(model.config.to_dict(), indent=2) + "\n"
    _atomic_write(directory / CONFIG_NAME, lambda p: p.write_text(text, encoding="utf-8"))
    return directory


def read_config(directory: str | Path) -> AttentionResUNetConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (a checkpoint folder holds {CONFIG_NAME})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    try:
        return AttentionResUNetConfig.from_dict(data, source=str(path))
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc


def check_state_dict(expected: dict, found: dict, source: str) -> None:
    """Raise :class:`CheckpointError` naming every missing/unexpected key and bad shape."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(found[k].shape)}, model {tuple(expected[k].shape)}"
        for k in set(expected) & set(found)
        if tuple(found[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if shapes:
        problems.append(f"shape mismatches {shapes}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


def load_pretrained(directory: str | Path, map_location: str | torch.device = "cpu"):
    """Build the model ``config.json`` describes and load ``model.safetensors`` strictly."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from attn_medical.models.res_unet import AttentionResUNet

    directory = Path(directory)
    config = read_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{weights}: no such file")
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights}: cannot read the weights ({exc})") from exc
    model = AttentionResUNet(config)
    check_state_dict(model.state_dict(), state, str(weights))
    model.load_state_dict(state, strict=True)
    return model.to(map_location)
