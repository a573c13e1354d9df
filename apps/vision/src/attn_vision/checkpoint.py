"""Weights in and out: official ``.pth`` files, safetensors, and pretrained folders.

A pretrained folder (``model.safetensors`` + ``config.json``) is written in timm's own
Hugging Face layout (``architecture``, ``num_classes``, ``pretrained_cfg`` with the
preprocessing and ``label_names``, ``model_args``), so ``timm.create_model("local-dir:DIR",
pretrained=True)`` reads it as well as :func:`create_model` here.

Every load goes through ``attn_training.pretrained.load_state_dict_checked``: a key that is
missing, unexpected or of the wrong shape is named in the error, and nothing is unpickled
beyond tensors (``torch.load(weights_only=True)``; the ``argparse.Namespace`` that training
scripts store next to the weights is the one other type allowed).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models._hub import save_config_for_hf
from torch import Tensor, nn

from attn_training.pretrained import (
    CONFIG_NAME,
    LoadReport,
    StateDictMismatchError,
    load_state_dict_checked,
    load_weights,
    save_pretrained_state,
)
from attn_vision.models import biformer

__all__ = [
    "StateDictMismatchError",
    "create_model",
    "hf_config",
    "load_checkpoint",
    "read_state_dict",
    "save_model_folder",
]


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a pretrained folder, a ``.safetensors`` file or a PyTorch checkpoint.

    PyTorch checkpoints are unwrapped from ``{"model": ...}`` (the official BiFormer
    layout) or ``{"state_dict": ...}``.
    """
    with torch.serialization.safe_globals([argparse.Namespace]):
        return load_weights(path)


def _filter_fn(model: nn.Module):
    if isinstance(model, biformer.BiFormer):
        return biformer.checkpoint_filter_fn
    return lambda state_dict, _model: state_dict


def classifier_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier named by the model's ``pretrained_cfg``."""
    name = getattr(model, "pretrained_cfg", {}).get("classifier")
    if not name:
        return set()
    names = (name,) if isinstance(name, str) else tuple(name)
    return {k for k in model.state_dict() if any(k.startswith(n + ".") for n in names)}


def load_checkpoint(
    model: nn.Module, path: str | Path, *, new_head: bool = False, skip_mismatched: bool = False
) -> LoadReport:
    """Load the weights at ``path`` into ``model`` with strict key and shape checks.

    Official BiFormer checkpoints are renamed to this package's layout first. With
    ``new_head=True`` (fine-tuning to other classes) the classifier keeps its fresh
    initialisation when its shape differs; every other key must still match. With
    ``skip_mismatched=True`` any missing or mis-shaped key keeps the model's value and
    unexpected keys are ignored (all listed in the returned report).
    """
    state_dict = _filter_fn(model)(read_state_dict(path), model)
    if skip_mismatched:
        return load_state_dict_checked(model, state_dict, skip_mismatched=True, source=str(path))
    if not new_head:
        return load_state_dict_checked(model, state_dict, source=str(path))
    head = classifier_keys(model)
    expected = model.state_dict()
    kept = {
        k: v
        for k, v in state_dict.items()
        if k not in head or (k in expected and v.shape == expected[k].shape)
    }
    report = load_state_dict_checked(model, kept, skip_mismatched=True, source=str(path))
    not_head = [k for k in report.skipped if k not in head] + report.unexpected
    if not_head:
        raise StateDictMismatchError(
            f"{path} does not match {type(model).__name__} outside the classifier: "
            f"{report.describe()}"
        )
    return report


def hf_config(
    model: nn.Module,
    label_names: list[str] | None = None,
    data_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """timm's ``config.json`` content for ``model`` (architecture, model_args, the
    preprocessing in ``pretrained_cfg`` -- ``data_config`` when given, e.g. the input size a
    model was trained at -- and ``label_names`` when given)."""
    model_config: dict[str, Any] = {}
    if label_names is not None:
        model_config["label_names"] = list(label_names)
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / CONFIG_NAME
        save_config_for_hf(
            model, str(config_path), model_config=model_config, data_config=data_config
        )
        config = json.loads(config_path.read_text())
    # The weights are no longer those of the registered tag (e.g. "in1k") once trained here.
    config["pretrained_cfg"].pop("tag", None)
    return config


def save_model_folder(
    model: nn.Module,
    folder: str | Path,
    *,
    label_names: list[str] | None = None,
    extra_json: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Write ``model`` as a pretrained folder (atomically) in timm's Hugging Face layout."""
    config = hf_config(model, label_names)
    return save_pretrained_state(folder, model.state_dict(), config, extra_json=extra_json)


def create_model(
    spec: str,
    *,
    checkpoint: str | Path | None = None,
    num_classes: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A model from a registered name (``biformer_tiny``, ``halonet26t``, ...) or a
    pretrained folder, optionally with weights from ``checkpoint``.

    ``num_classes`` different from the weights' builds a new classifier (fine-tuning).
    """
    folder = Path(spec)
    if (folder / CONFIG_NAME).is_file():
        config = json.loads((folder / CONFIG_NAME).read_text())
        args = dict(config.get("model_args", {}), **kwargs)
        saved_classes = config.get("num_classes", args.pop("num_classes", None))
        args.pop("num_classes", None)
        model = timm.create_model(config["architecture"], num_classes=saved_classes, **args)
        load_checkpoint(model, folder)
        saved_cfg = {
            k: tuple(v) if isinstance(v, list) else v
            for k, v in config.get("pretrained_cfg", {}).items()
        }
        model.pretrained_cfg = dict(model.pretrained_cfg, **saved_cfg)
        if "label_names" in config:
            model.pretrained_cfg["label_names"] = list(config["label_names"])
        if num_classes is not None and num_classes != saved_classes:
            model.reset_classifier(num_classes)
            model.pretrained_cfg["num_classes"] = num_classes
            model.pretrained_cfg.pop("label_names", None)
    else:
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        model = timm.create_model(spec, pretrained=False, **kwargs)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, new_head=num_classes is not None)
    return model


def label_names(model: nn.Module) -> list[str]:
    """Class names from the model's ``pretrained_cfg`` (``label_names``), else ``class_<i>``."""
    names = getattr(model, "pretrained_cfg", {}).get("label_names")
    n = getattr(model, "num_classes", 0)
    if names and len(names) == n:
        return list(names)
    return [f"class_{i}" for i in range(n)]
