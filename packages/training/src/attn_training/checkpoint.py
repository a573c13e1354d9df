"""Training checkpoints: atomic folders with a manifest, validation, retention.

A checkpoint is ``<root>/step-<8 digits>/`` holding

==================  ========================================================
model.safetensors   model weights (full, unsharded)
ema.safetensors     EMA weights (when EMA is on)
rng.safetensors     generator states of every rank, stacked on the first axis
optimizer.pt        optimizer state  } plain containers of tensors and numbers,
scheduler.pt        scheduler state  } read with ``torch.load(weights_only=True)``
scaler.pt           fp16 grad scaler }
aux/<name>/         an auxiliary model trained alongside (e.g. a GAN discriminator):
                    its model.safetensors, optimizer.pt and scheduler.pt
trainer_state.json  step, data position, counters, best metric, ...
manifest.json       size and SHA-256 of every file above, written last
==================  ========================================================

The folder is written under a temporary name and renamed when complete, so a crash
leaves either no checkpoint or a whole one. A checkpoint damaged afterwards (a
truncated or altered file) fails :func:`verify_checkpoint`.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from attn_training.fsutil import atomic_folder, remove_stale_temporaries, sha256_file
from attn_training.pretrained import untie_state_dict

logger = logging.getLogger("attn_training")

MANIFEST_NAME = "manifest.json"
FORMAT = "attn-training-checkpoint"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"step-(\d{8,})")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged or does not fit the run."""


@dataclass
class CheckpointContent:
    """Everything a checkpoint holds, as plain tensors and containers."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    state: dict[str, Any]
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    ema: dict[str, torch.Tensor] | None = None
    aux: dict[str, AuxContent] = field(default_factory=dict)
    """Auxiliary models by name."""


@dataclass
class AuxContent:
    """An auxiliary model's weights, optimizer and scheduler states."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None = None


AUX_DIR = "aux"
_AUX_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def check_aux_name(name: str) -> str:
    """``name`` if it can name an auxiliary model's folder, else ``ValueError``."""
    if not _AUX_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"auxiliary model name {name!r}: use letters, digits, '_', '-', '.'")
    return name


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint after ``step`` optimizer steps."""
    return f"step-{step:08d}"


def checkpoint_step(path: Path) -> int | None:
    """The step of a checkpoint folder name, or ``None`` if it is not one."""
    match = _STEP_DIR.fullmatch(path.name)
    return int(match.group(1)) if match else None


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(untie_state_dict({k: v.cpu() for k, v in tensors.items()}), path)


def save_checkpoint(root: Path, step: int, content: CheckpointContent) -> Path:
    """Write ``content`` as ``root/step-<step>`` atomically; returns the folder."""
    dest = Path(root) / checkpoint_name(step)
    with atomic_folder(dest) as tmp:
        _save_tensors(tmp / "model.safetensors", content.model)
        if content.ema is not None:
            _save_tensors(tmp / "ema.safetensors", content.ema)
        if content.rng:
            _save_tensors(tmp / "rng.safetensors", content.rng)
        torch.save(content.optimizer, tmp / "optimizer.pt")
        if content.scheduler is not None:
            torch.save(content.scheduler, tmp / "scheduler.pt")
        if content.scaler is not None:
            torch.save(content.scaler, tmp / "scaler.pt")
        for name, aux in content.aux.items():
            folder = tmp / AUX_DIR / check_aux_name(name)
            folder.mkdir(parents=True)
            _save_tensors(folder / "model.safetensors", aux.model)
            torch.save(aux.optimizer, folder / "optimizer.pt")
            if aux.scheduler is not None:
                torch.save(aux.scheduler, folder / "scheduler.pt")
        (tmp / "trainer_state.json").write_text(
            json.dumps(content.state, indent=2, sort_keys=True) + "\n"
        )
        _write_manifest(tmp, step)
    return dest


def _write_manifest(folder: Path, step: int) -> None:
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "step": step, "files": files}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def verify_checkpoint(folder: Path) -> str | None:
    """``None`` if every file listed in the manifest is present and intact, else the problem."""
    manifest_path = Path(folder) / MANIFEST_NAME
    if not manifest_path.is_file():
        return f"no {MANIFEST_NAME} (the write did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST_NAME} is unreadable ({exc})"
    if manifest.get("format") != FORMAT:
        return f"{MANIFEST_NAME} is not an {FORMAT} manifest"
    for name, expected in files.items():
        path = Path(folder) / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes, the manifest says {expected['size']}"
        if sha256_file(path) != expected["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest"
    return None


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def find_latest_valid(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest intact checkpoint under ``root`` and the damaged newer ones with reasons.

    Each damaged checkpoint is also reported as a warning. Leftovers of interrupted
    writes are cleaned up first.
    """
    remove_stale_temporaries(Path(root))
    damaged: list[tuple[Path, str]] = []
    for folder in reversed(list_checkpoints(root)):
        problem = verify_checkpoint(folder)
        if problem is None:
            return folder, damaged
        logger.warning("checkpoint %s is damaged and is skipped: %s", folder, problem)
        damaged.append((folder, problem))
    return None, damaged


def prune_checkpoints(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest checkpoints; returns the deleted folders."""
    folders = list_checkpoints(root)
    doomed = folders[:-keep_last] if keep_last > 0 else []
    for folder in doomed:
        shutil.rmtree(folder, ignore_errors=True)
    return doomed


def load_checkpoint(folder: Path, *, verify: bool = True) -> CheckpointContent:
    """Read a checkpoint on the CPU without unpickling anything but plain containers."""
    folder = Path(folder)
    if verify and (problem := verify_checkpoint(folder)) is not None:
        raise CheckpointError(f"checkpoint {folder} is damaged: {problem}")

    def tensors(name: str) -> dict[str, torch.Tensor] | None:
        path = folder / name
        return load_file(path) if path.is_file() else None

    def obj(name: str | Path) -> Any:
        path = folder / name
        return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None

    aux = {}
    aux_root = folder / AUX_DIR
    for sub in sorted(aux_root.iterdir()) if aux_root.is_dir() else []:
        weights, opt = tensors(f"{AUX_DIR}/{sub.name}/model.safetensors"), obj(sub / "optimizer.pt")
        if weights is None or opt is None:
            raise CheckpointError(f"{sub}: auxiliary model without weights or optimizer state")
        aux[sub.name] = AuxContent(weights, opt, obj(sub / "scheduler.pt"))

    model = tensors("model.safetensors")
    optimizer = obj("optimizer.pt")
    if model is None or optimizer is None:
        raise CheckpointError(f"{folder} is not a training checkpoint (no model or optimizer)")
    return CheckpointContent(
        model=model,
        optimizer=optimizer,
        state=json.loads((folder / "trainer_state.json").read_text()),
        rng=tensors("rng.safetensors") or {},
        scheduler=obj("scheduler.pt"),
        scaler=obj("scaler.pt"),
        ema=tensors("ema.safetensors"),
        aux=aux,
    )
