"""Segmenting images and volumes with a trained network.

Inputs larger than the training patch along any axis go through MONAI's
``sliding_window_inference`` with Gaussian blending (``mode="gaussian"``: each window's
prediction is weighted by a Gaussian centred on the window, which down-weights the
less reliable window borders, as nnU-Net); inputs that fit run in one pass (the network
pads any size to its stride multiple). Flip test-time augmentation averages the softmax
of every combination of flipped spatial axes (4 passes in 2D, 8 in 3D).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from attn_medical.datasets import match_picture_channels
from attn_medical.io import (
    InputError,
    Loaded,
    case_name,
    is_supported,
    is_volume,
    read_image,
    write_mask,
)
from attn_medical.transforms import Preprocessing, normalise

log = logging.getLogger(__name__)


def flip_combinations(spatial_dims: int) -> list[tuple[int, ...]]:
    """Every subset of the spatial axes of ``[B, C, *S]`` (as tensor dims), ``()`` first."""
    axes = range(2, 2 + spatial_dims)
    return [c for r in range(spatial_dims + 1) for c in itertools.combinations(axes, r)]


@torch.no_grad()
def predict_probabilities(
    model: torch.nn.Module,
    image: torch.Tensor,
    patch_size: Sequence[int],
    *,
    tta: bool = False,
    overlap: float = 0.5,
    sw_batch_size: int = 4,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Class probabilities ``[K, *S]`` (float32, CPU) for a normalised ``[C, *S]`` image."""
    from monai.inferers import sliding_window_inference

    x = image[None].to(device=device, dtype=torch.float32)
    patch = tuple(int(p) for p in patch_size)
    windowed = any(s > p for s, p in zip(x.shape[2:], patch))

    def run(t: torch.Tensor) -> torch.Tensor:
        if windowed:
            logits = sliding_window_inference(
                t, patch, sw_batch_size, model, overlap=overlap, mode="gaussian"
            )
        else:
            logits = model(t)
        return torch.softmax(torch.as_tensor(logits).float(), dim=1)

    flips = flip_combinations(x.dim() - 2) if tta else [()]
    total = None
    for dims in flips:
        probs = run(torch.flip(x, dims) if dims else x)
        probs = torch.flip(probs, dims) if dims else probs
        total = probs if total is None else total + probs
    return (total / len(flips))[0].cpu()


@dataclass
class InferenceCase:
    """The file(s) of one case: one per channel (nnU-Net) or one holding all channels."""

    name: str
    files: list[Path]


def _channel_suffix(path: Path) -> tuple[str, int] | None:
    """``("case", 1)`` for nnU-Net's ``case_0001.nii.gz``; ``None`` for other names."""
    name = case_name(path)
    if is_volume(path) and len(name) > 5 and name[-5] == "_" and name[-4:].isdigit():
        return name[:-5], int(name[-4:])
    return None


def collect_cases(inputs: Sequence[Path | str], in_channels: int) -> list[InferenceCase]:
    """Files and folders (their supported files, not recursive) as cases.

    Volumes named as nnU-Net's channel files (``case_0000.nii.gz``, ``case_0001.nii.gz``,
    ...) become one case ``case`` holding its channel files in order when the model takes
    several channels; for a one-channel model ``case_0000.nii.gz`` is case ``case``.
    """
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.iterdir() if p.is_file() and is_supported(p))
        else:
            files.append(item)
    cases: list[InferenceCase] = []
    grouped: dict[str, list[Path]] = {}
    for path in files:
        channel = _channel_suffix(path)
        if channel is not None and in_channels > 1:
            grouped.setdefault(channel[0], []).append(path)
        elif channel is not None and channel[1] == 0:
            cases.append(InferenceCase(channel[0], [path]))
        else:
            cases.append(InferenceCase(case_name(path), [path]))
    for name, group in grouped.items():
        cases.append(InferenceCase(name, sorted(group)))
    return cases


def load_for_model(case: InferenceCase, spatial_dims: int, in_channels: int) -> Loaded:
    """Read a case's file(s) as ``[C, *S]`` and check they fit the model."""
    parts = [read_image(p) for p in case.files]
    image = parts[0]
    for part in parts[1:]:
        if part.spatial_shape != image.spatial_shape:
            raise InputError(
                part.path,
                f"size {part.spatial_shape} differs from {image.path} {image.spatial_shape}",
            )
    if len(parts) > 1:
        image.array = np.concatenate([p.array for p in parts])
    if image.ndim != spatial_dims:
        raise InputError(image.path, f"a {image.ndim}D input, but the model is {spatial_dims}D")
    if spatial_dims == 2:
        image.array = match_picture_channels(image.array, in_channels)
    elif image.array.shape[0] != in_channels:
        raise InputError(
            image.path, f"{image.array.shape[0]} channel(s), the model takes {in_channels}"
        )
    return image


class Segmenter:
    """A loaded checkpoint, ready to segment files.

    ``segment(loaded)`` returns ``(labels [*S] uint8, probabilities [K, *S])``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        tta: bool = False,
        overlap: float = 0.5,
        sw_batch_size: int = 4,
        device: str = "cpu",
    ) -> None:
        self.model = model.to(device).eval()
        self.config = model.config
        self.prep = Preprocessing.from_dict(self.config.preprocessing)
        self.tta, self.overlap, self.sw_batch_size, self.device = (
            tta,
            overlap,
            sw_batch_size,
            device,
        )

    @classmethod
    def from_pretrained(cls, directory: Path | str, **kwargs) -> Segmenter:
        from attn_medical.models import load_pretrained

        return cls(load_pretrained(directory, map_location=kwargs.get("device", "cpu")), **kwargs)

    def segment(self, image: Loaded) -> tuple[np.ndarray, torch.Tensor]:
        x = torch.from_numpy(normalise(image.array, self.prep, image.max_value))
        probs = predict_probabilities(
            self.model,
            x,
            self.prep.patch_size,
            tta=self.tta,
            overlap=self.overlap,
            sw_batch_size=self.sw_batch_size,
            device=self.device,
        )
        return probs.argmax(0).numpy().astype(np.uint8), probs


def infer_files(
    segmenter: Segmenter,
    inputs: Sequence[Path | str],
    out_dir: Path,
    *,
    overwrite: bool = False,
    overlays: bool = True,
    progress: bool = True,
    report: Callable[[str], None] | None = None,
) -> tuple[list[Path], list[InputError]]:
    """Segment every case; write masks (and 2D overlays) to ``out_dir``.

    A case that fails is reported as it happens (``report(message)``, default: the log)
    and returned as a problem; the other cases go on.
    """
    from tqdm.auto import tqdm

    from attn_medical.overlay import write_overlay

    cfg = segmenter.config
    cases = collect_cases(inputs, cfg.in_channels)
    written: list[Path] = []
    problems: list[InputError] = []
    for case in tqdm(cases, desc="infer", unit="case", disable=not progress):
        suffix = ".nii.gz" if is_volume(case.files[0]) else ".png"
        target = Path(out_dir) / f"{case.name}{suffix}"
        try:
            if target.exists() and not overwrite:
                raise InputError(target, "exists; pass --overwrite to replace it")
            image = load_for_model(case, cfg.spatial_dims, cfg.in_channels)
            labels, _ = segmenter.segment(image)
            written.append(write_mask(labels, image, target, cfg.out_channels))
            if overlays and image.ndim == 2:
                write_overlay(image, labels, out_dir / "overlays" / f"{case.name}.png")
        except InputError as exc:
            (report or log.error)(f"error: {exc}")
            problems.append(exc)
    return written, problems
