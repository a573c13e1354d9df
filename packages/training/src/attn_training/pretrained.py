"""Pretrained-model folders: ``model.safetensors`` + ``config.json``, with strict loading.

This module is what an app's inference code needs, and imports neither ``accelerate``
nor anything else of the training loop. A folder written here holds

- ``config.json``: the keyword arguments that rebuild the model (``cls(**config)``);
- ``model.safetensors``, or for large models ``model-0000i-of-0000n.safetensors`` shards
  with ``model.safetensors.index.json`` (the Hugging Face layout, so
  ``huggingface_hub.PyTorchModelHubMixin`` models read the same folders).

Loading never unpickles: weights come from safetensors, and foreign ``.pt``/``.ckpt``
files go through ``torch.load(weights_only=True)``. Every load checks keys and shapes
and names each missing, unexpected or mismatched key.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file

from attn_training.fsutil import atomic_folder

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "10GB"

_M = TypeVar("_M", bound="PretrainedMixin")


class StateDictMismatchError(ValueError):
    """Weights do not fit the model; the message names every offending key."""


@dataclass
class LoadReport:
    """What :func:`load_state_dict_checked` found and did."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    """``(key, shape in the model, shape in the weights)``."""
    skipped: list[str] = field(default_factory=list)
    """Keys left at the model's own values because ``skip_mismatched`` allowed it."""
    loaded: int = 0

    def describe(self) -> str:
        """Human-readable summary naming every key that was not loaded as-is."""
        lines = [f"{self.loaded} tensors loaded"]
        if self.missing:
            lines.append(f"missing in the weights ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(
                f"unexpected in the weights ({len(self.unexpected)}): {', '.join(self.unexpected)}"
            )
        if self.mismatched:
            shapes = ", ".join(
                f"{k} (model {list(m)}, weights {list(w)})" for k, m, w in self.mismatched
            )
            lines.append(f"shape mismatch ({len(self.mismatched)}): {shapes}")
        if self.skipped:
            lines.append(
                f"skipped, kept at the model's initial values ({len(self.skipped)}): "
                + ", ".join(self.skipped)
            )
        return "; ".join(lines)


def load_state_dict_checked(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    skip_mismatched: bool = False,
    source: str = "weights",
) -> LoadReport:
    """Load ``state_dict`` into ``model`` after checking every key and shape.

    With ``skip_mismatched=False`` any missing, unexpected or shape-mismatched key raises
    :class:`StateDictMismatchError` listing all of them, and the model is left unchanged.
    With ``skip_mismatched=True`` (fine-tuning with a new head) keys whose shape differs
    and keys missing from ``state_dict`` keep the model's values, unexpected keys are
    ignored, and everything skipped is listed in the returned report.
    """
    expected = model.state_dict()
    report = LoadReport()
    report.missing = [k for k in expected if k not in state_dict]
    report.unexpected = [k for k in state_dict if k not in expected]
    report.mismatched = [
        (k, tuple(expected[k].shape), tuple(v.shape))
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if not skip_mismatched and (report.missing or report.unexpected or report.mismatched):
        raise StateDictMismatchError(
            f"{source} do not match {type(model).__name__}: {report.describe()}"
        )
    mismatched = {k for k, _, _ in report.mismatched}
    usable = {k: v for k, v in state_dict.items() if k in expected and k not in mismatched}
    report.skipped = sorted(mismatched) + report.missing
    report.loaded = len(usable)
    # Every remaining key was checked above; strict=False only tolerates the skipped ones.
    model.load_state_dict(usable, strict=False)
    return report


def untie_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached contiguous tensors, cloning views that share storage (tied weights)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, value in state_dict.items():
        tensor = value.detach()
        if tensor.device.type != "meta" and tensor.numel() > 0:
            ident = (tensor.untyped_storage().data_ptr(), tensor.device.index or 0)
            if ident in seen:
                tensor = tensor.clone()
            else:
                seen.add(ident)
        out[key] = tensor.contiguous()
    return out


def save_pretrained_state(
    folder: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    *,
    extra_json: Mapping[str, Mapping[str, Any]] | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write a pretrained folder atomically (a complete folder appears, or none).

    ``config`` must be JSON-serialisable; ``extra_json`` adds ``{filename: content}``
    side files (e.g. the validation score of a best checkpoint).
    """
    folder = Path(folder)
    text = _config_json(config)
    with atomic_folder(folder) as tmp:
        save_torch_state_dict(untie_state_dict(state_dict), tmp, max_shard_size=max_shard_size)
        (tmp / CONFIG_NAME).write_text(text)
        for name, content in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    return folder


def _config_json(config: Mapping[str, Any]) -> str:
    try:
        return json.dumps(_jsonable(dict(config)), indent=2, sort_keys=True) + "\n"
    except TypeError as exc:
        raise TypeError(f"model config is not JSON-serialisable: {exc}") from None


def _jsonable(value: Any, where: str = "config") -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value), where)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{where} is a {type(value).__name__}")


def load_pretrained_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """Read the weights of a pretrained folder (single file or sharded) on the CPU."""
    folder = Path(folder)
    single, index = folder / WEIGHTS_NAME, folder / WEIGHTS_INDEX_NAME
    if single.is_file():
        return load_file(single)
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(load_file(folder / shard))
        return state
    raise FileNotFoundError(f"{folder}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}")


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a pretrained folder, a ``.safetensors`` file or a PyTorch file.

    PyTorch files (``.pt``, ``.pth``, ``.ckpt``, ``.bin``) are read with
    ``torch.load(weights_only=True)``; a ``{"state_dict": ...}`` or ``{"model": ...}``
    wrapper is unwrapped. Files that need arbitrary unpickling are refused.
    """
    path = Path(path)
    if path.is_dir():
        return load_pretrained_state(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a weights-only PyTorch file ({exc})") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: does not hold a state dict of tensors")
    return dict(obj)


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` for a ``torch.nn.Module`` subclass.

    The arguments of ``__init__`` are recorded when the model is built and become
    ``config.json``; ``from_pretrained`` calls ``cls(**config)`` and loads the weights with
    strict key and shape checks. Arguments must be JSON-serialisable (numbers, strings,
    lists, dicts, ``None``) or dataclasses of those; a parameter annotated with a dataclass
    type is rebuilt as that dataclass when loading.

    Example::

        class Classifier(PretrainedMixin, nn.Module):
            def __init__(self, num_classes: int = 10, width: int = 64):
                super().__init__()
                ...

        model = Classifier(num_classes=5)
        model.save_pretrained("out/final")
        same = Classifier.from_pretrained("out/final")
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__:
            return
        original = cls.__dict__["__init__"]
        signature = inspect.signature(original)
        if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in signature.parameters.values()):
            raise TypeError(f"{cls.__name__}.__init__ takes *args, which config.json cannot hold")

        @functools.wraps(original)
        def __init__(self, *args: Any, **kw: Any) -> None:
            # Only the outermost (most derived) __init__ records the configuration.
            if "_pretrained_config" not in self.__dict__:
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                config = dict(bound.arguments)
                config.pop(next(iter(signature.parameters)))
                for name, param in signature.parameters.items():
                    if param.kind is inspect.Parameter.VAR_KEYWORD:
                        config.update(config.pop(name, {}))
                object.__setattr__(self, "_pretrained_config", config)
            original(self, *args, **kw)

        cls.__init__ = __init__

    @property
    def pretrained_config(self) -> dict[str, Any]:
        """The ``__init__`` arguments this model was built with (becomes ``config.json``)."""
        return dict(self.__dict__.get("_pretrained_config", {}))

    def save_pretrained(
        self, folder: str | Path, *, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
    ) -> Path:
        """Write ``config.json`` and the weights to ``folder`` (atomically)."""
        assert isinstance(self, torch.nn.Module)
        return save_pretrained_state(
            folder, self.state_dict(), self.pretrained_config, max_shard_size=max_shard_size
        )

    @classmethod
    def from_pretrained(
        cls: type[_M],
        folder: str | Path,
        *,
        map_location: str | torch.device = "cpu",
        strict: bool = True,
        **overrides: Any,
    ) -> _M:
        """Build the model from ``folder/config.json`` and load its weights.

        ``overrides`` replace config entries (e.g. ``num_classes=3`` together with
        ``strict=False`` to re-use a backbone under a new head). With ``strict=False``
        keys whose shape differs or that are missing keep their initial values; the
        report is attached as ``model.load_report``.
        """
        folder = Path(folder)
        config_path = folder / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{folder}: no {CONFIG_NAME}; not a pretrained folder")
        config = json.loads(config_path.read_text())
        config.update(overrides)
        model = cls(**_rebuild_dataclasses(cls, config))
        assert isinstance(model, torch.nn.Module)
        report = load_state_dict_checked(
            model, load_pretrained_state(folder), skip_mismatched=not strict, source=str(folder)
        )
        model.load_report = report
        return model.to(map_location).eval()


def _rebuild_dataclasses(cls: type, config: dict[str, Any]) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolved forward references: leave values as JSON
        return config
    out = dict(config)
    for name, value in config.items():
        kind = _dataclass_type(hints.get(name))
        if kind is not None and isinstance(value, dict):
            out[name] = kind(**value)
    return out


def _dataclass_type(hint: Any) -> type | None:
    """The dataclass named by an annotation, also inside ``X | None``."""
    candidates = typing.get_args(hint) or (hint,)
    found = [c for c in candidates if isinstance(c, type) and dataclasses.is_dataclass(c)]
    return found[0] if len(found) == 1 else None
