"""What the ``train`` command feeds the training harness: data, patches and validation.

The cases are read, checked and normalised once (:func:`prepare_cases`); every draw from
:class:`PatchDataset` is a fresh augmented patch (MONAI transforms, see
:func:`attn_medical.transforms.train_transform`). :func:`validate` segments the whole
validation images the way ``infer`` does and reports Dice per class.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from attn_medical.datasets import DatasetSpec, LoadedCase
from attn_medical.inference import predict_probabilities
from attn_medical.transforms import Preprocessing, ct_statistics, is_ct, normalise

log = logging.getLogger(__name__)


@dataclass
class PreparedCase:
    """A normalised case: ``image`` ``[C, *S]`` float32, ``label`` ``[1, *S]`` int64."""

    name: str
    path: Path
    image: np.ndarray
    label: np.ndarray


def auto_patch_size(cases: Sequence[LoadedCase], divisor: Sequence[int], cap: int) -> list[int]:
    """The median case shape, capped at ``cap`` and rounded down to multiples of ``divisor``."""
    shapes = np.array([c.image.spatial_shape for c in cases])
    median = np.median(shapes, axis=0)
    return [max(d, int(min(m, cap)) // d * d) for m, d in zip(median, divisor)]


def build_preprocessing(
    spec: DatasetSpec, cases: Sequence[LoadedCase], patch_size: Sequence[int]
) -> Preprocessing:
    """Modalities of the dataset; CT statistics from the training cases' foreground."""
    stats: list[list[float] | None] = []
    for c, modality in enumerate(spec.modalities):
        if is_ct(modality):
            stats.append(ct_statistics([x.image.array for x in cases], [x.label for x in cases], c))
        else:
            stats.append(None)
    return Preprocessing(list(spec.modalities), [int(p) for p in patch_size], stats)


def prepare_cases(cases: Sequence[LoadedCase], prep: Preprocessing) -> list[PreparedCase]:
    return [
        PreparedCase(
            c.name, c.image.path, normalise(c.image.array, prep, c.image.max_value), c.label
        )
        for c in cases
    ]


class PatchDataset(Dataset):
    """``length`` draws, cycling over the cases; each an augmented ``{"image", "label"}`` patch.

    Every draw re-seeds the MONAI transforms from NumPy's global generator, so a caller
    that seeds per sample (the harness does) gets reproducible patches.
    """

    def __init__(self, cases: Sequence[PreparedCase], transform, length: int | None = None):
        if not cases:
            raise ValueError("no training cases")
        self.cases = list(cases)
        self.transform = transform
        self.length = length or len(self.cases)

    def __len__(self) -> int:
        return self.length

    def sample_path(self, index: int) -> str:
        return str(self.cases[index % len(self.cases)].path)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        case = self.cases[index % len(self.cases)]
        # The harness seeds NumPy's global generator per sample; MONAI's transforms keep
        # their own, so they are re-seeded from it.
        seed = int(np.random.randint(0, 2**31 - 1))  # noqa: NPY002
        self.transform.set_random_state(seed=seed)
        out = self.transform({"image": case.image, "label": case.label})
        if isinstance(out, list):
            out = out[0]
        return {
            "image": torch.as_tensor(np.asarray(out["image"]), dtype=torch.float32),
            "label": torch.as_tensor(np.asarray(out["label"]), dtype=torch.int64),
        }


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    cases: Sequence[PreparedCase],
    patch_size: Sequence[int],
    num_classes: int,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Dice per foreground class over ``cases`` (cases whose GT lacks a class skip it).

    Returns ``{"dice": mean over classes, "dice_1": ..., "dice_2": ...}``.
    """
    from monai.metrics import compute_dice

    was_training = model.training
    model.eval()
    per_class: list[list[float]] = [[] for _ in range(num_classes - 1)]
    for case in cases:
        probs = predict_probabilities(
            model, torch.from_numpy(case.image), patch_size, device=device
        )
        pred = torch.nn.functional.one_hot(probs.argmax(0), num_classes).movedim(-1, 0)[None]
        gt = torch.nn.functional.one_hot(torch.from_numpy(case.label[0]), num_classes).movedim(
            -1, 0
        )[None]
        dice = compute_dice(pred.float(), gt.float(), include_background=False, ignore_empty=True)
        for k, value in enumerate(dice[0].tolist()):
            if not math.isnan(value):
                per_class[k].append(value)
    model.train(was_training)
    out = {f"dice_{k + 1}": float(np.mean(v)) if v else math.nan for k, v in enumerate(per_class)}
    defined = [v for v in out.values() if not math.isnan(v)]
    out = {"dice": float(np.mean(defined)) if defined else math.nan, **out}
    return out
