"""Intensity normalisation per modality and the training augmentation, with MONAI transforms.

Normalisation (nnU-Net's scheme, Isensee et al. 2021), per input channel:

* ``CT``: clip to the 0.5th/99.5th percentiles of the training set's foreground
  intensities, then z-score with the foreground mean and standard deviation;
* ``rgb`` / ``grey`` pictures: scale ``[0, max of the pixel type]`` to ``[0, 1]``;
* anything else (``MR``, ``T1``, ...): z-score per image and channel.

The statistics and the patch size travel in the checkpoint (:class:`Preprocessing`), so
inference normalises new files exactly as training did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PICTURE_MODALITIES = ("rgb", "grey")


@dataclass
class Preprocessing:
    """How a network's inputs are prepared.

    ``modalities``: one name per input channel. ``patch_size``: the training patch, also
    the sliding-window size at inference. ``ct_stats``: per channel ``[lo, hi, mean, std]``
    for CT channels, ``None`` for the others.
    """

    modalities: list[str]
    patch_size: list[int]
    ct_stats: list[list[float] | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.ct_stats:
            self.ct_stats = [None] * len(self.modalities)
        if len(self.ct_stats) != len(self.modalities):
            raise ValueError("ct_stats needs one entry per modality")
        for m, s in zip(self.modalities, self.ct_stats):
            if is_ct(m) and s is None:
                raise ValueError("a CT channel needs its [lo, hi, mean, std] statistics")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        return cls(
            modalities=list(data["modalities"]),
            patch_size=[int(p) for p in data["patch_size"]],
            ct_stats=list(data.get("ct_stats") or []),
        )


def is_ct(modality: str) -> bool:
    return modality.strip().upper() == "CT"


def ct_statistics(
    images: Sequence[np.ndarray], labels: Sequence[np.ndarray], channel: int, seed: int = 0
) -> list[float]:
    """``[p0.5, p99.5, mean, std]`` of channel ``channel`` over the foreground voxels.

    ``images`` are ``[C, *S]``, ``labels`` ``[1, *S]``; up to 10,000 foreground voxels are
    drawn from each case (nnU-Net's sampling), all of them when fewer.
    """
    rng = np.random.default_rng(seed)
    samples = []
    for image, label in zip(images, labels):
        values = image[channel][label[0] > 0]
        if values.size > 10_000:
            values = rng.choice(values, 10_000, replace=False)
        samples.append(values.astype(np.float64))
    values = np.concatenate(samples) if samples else np.zeros(0)
    if values.size == 0:
        raise ValueError("no foreground voxels to compute CT statistics from")
    lo, hi = np.percentile(values, [0.5, 99.5])
    return [float(lo), float(hi), float(values.mean()), float(max(values.std(), 1e-8))]


def normalise(image: np.ndarray, prep: Preprocessing, max_value: float | None = None) -> np.ndarray:
    """Normalise ``[C, *S]`` raw intensities channel by channel (see the module doc)."""
    from monai.transforms import NormalizeIntensity, ScaleIntensityRange

    if image.shape[0] != len(prep.modalities):
        raise ValueError(f"{image.shape[0]} channels, the model expects {len(prep.modalities)}")
    out = np.empty(image.shape, dtype=np.float32)
    for c, (modality, stats) in enumerate(zip(prep.modalities, prep.ct_stats)):
        channel = image[c : c + 1]
        if is_ct(modality):
            lo, hi, mean, std = stats
            t = ScaleIntensityRange(lo, hi, (lo - mean) / std, (hi - mean) / std, clip=True)
        elif modality in PICTURE_MODALITIES:
            top = max_value if max_value else max(float(channel.max()), 1.0)
            t = ScaleIntensityRange(0.0, top, 0.0, 1.0)
        else:
            t = NormalizeIntensity()
        out[c : c + 1] = np.asarray(t(channel), dtype=np.float32)
    return out


def train_transform(
    patch_size: Sequence[int], spatial_dims: int, augment: bool = True, fg_fraction: float = 0.33
):
    """MONAI dictionary transforms on ``{"image": [C, *S], "label": [1, *S]}``.

    Pads to the patch, draws one patch centred on foreground with probability
    ``fg_fraction`` (nnU-Net's oversampling), then spatial (affine, flips, 90-degree
    in-plane turns for 2D) and intensity (scale, shift, gamma, noise, blur) augmentation.
    """
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandAffined,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandRotate90d,
        RandScaleIntensityd,
        RandShiftIntensityd,
        SpatialPadd,
    )

    keys = ["image", "label"]
    patch = list(patch_size)
    steps: list = [
        SpatialPadd(keys, spatial_size=patch),
        RandCropByPosNegLabeld(
            keys,
            label_key="label",
            spatial_size=patch,
            pos=fg_fraction,
            neg=1 - fg_fraction,
            num_samples=1,
            allow_smaller=False,
        ),
    ]
    if augment:
        angle = np.pi / 12
        steps += [
            RandAffined(
                keys,
                prob=0.3,
                rotate_range=(angle,) if spatial_dims == 2 else (angle,) * 3,
                scale_range=(0.15,) * spatial_dims,
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            *[RandFlipd(keys, prob=0.5, spatial_axis=a) for a in range(spatial_dims)],
        ]
        if spatial_dims == 2:
            steps.append(RandRotate90d(keys, prob=0.5, spatial_axes=(0, 1)))
        steps += [
            RandScaleIntensityd("image", factors=0.15, prob=0.3),
            RandShiftIntensityd("image", offsets=0.1, prob=0.3),
            RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.2),
            RandGaussianNoised("image", std=0.05, prob=0.15),
            RandGaussianSmoothd("image", sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), prob=0.1),
        ]
    return Compose(steps)
