"""Finding training cases on disk and splitting them into folds.

Two layouts:

* 2D folders: ``ROOT/images/<name>.{png,jpg,...}`` with ``ROOT/masks/<name>.png`` (or
  ``labels/``), masks binary (0/255 or 0/1) or class indices;
* 3D, the Medical Segmentation Decathlon / nnU-Net raw layout: ``ROOT/dataset.json``,
  ``imagesTr/``, ``labelsTr/``. MSD's ``dataset.json`` lists ``training`` pairs and names
  channels under ``modality`` (a 4D image holds the channels); nnU-Net v2's names them under
  ``channel_names`` with one file per channel, ``<case>_<XXXX><file_ending>``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from attn_medical.io import (
    IMAGE_SUFFIXES,
    InputError,
    Loaded,
    case_name,
    read_image,
    read_label,
)


@dataclass
class Case:
    """One training case: its image file(s) (one per channel group) and label map."""

    name: str
    images: list[Path]
    label: Path | None


@dataclass
class DatasetSpec:
    """What a dataset folder holds.

    ``modalities`` names each input channel (``rgb`` x 3 or ``grey`` for pictures, ``CT``,
    ``MR``, ... for volumes); ``labels`` maps class index (string) to name; ``problems``
    lists the files that cannot be used (each an :class:`InputError`).
    """

    root: Path
    spatial_dims: int
    modalities: list[str]
    labels: dict[str, str]
    cases: list[Case]
    problems: list[InputError] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return max(int(k) for k in self.labels) + 1


def _pictures(folder: Path) -> dict[str, Path]:
    return {
        case_name(p): p
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    }


def discover_2d(root: Path) -> DatasetSpec:
    """Pair ``images/<name>.*`` with ``masks/<name>.*``; unpaired files become problems."""
    image_dir = root / "images"
    mask_dir = next((root / d for d in ("masks", "labels") if (root / d).is_dir()), None)
    if not image_dir.is_dir() or mask_dir is None:
        raise InputError(root, "expected the folders images/ and masks/ (or labels/)")
    images, masks = _pictures(image_dir), _pictures(mask_dir)
    problems = [
        InputError(images[n], f"no mask for this image (expected {mask_dir / n}.png)")
        for n in sorted(set(images) - set(masks))
    ]
    problems += [
        InputError(masks[n], "mask without an image of the same name")
        for n in sorted(set(masks) - set(images))
    ]
    cases = [Case(n, [images[n]], masks[n]) for n in sorted(set(images) & set(masks))]
    if not cases:
        raise InputError(root, "no image/mask pairs found")
    modality = _picture_modality(cases)
    modalities = ["grey"] if modality == "grey" else ["rgb"] * 3
    labels = {"0": "background", "1": "foreground"}
    return DatasetSpec(root, 2, modalities, labels, cases, problems)


def _picture_modality(cases: list[Case]) -> str:
    """``grey`` when every readable one of the first few pictures is grey, else ``rgb``."""
    channels = set()
    for case in cases[:8]:
        try:
            channels.add(read_image(case.images[0]).array.shape[0])
        except InputError:
            continue
    return "grey" if channels == {1} else "rgb"


def _labels_from_json(meta: dict, path: Path) -> dict[str, str]:
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise InputError(path, "dataset.json has no 'labels'")
    first = next(iter(labels.values()))
    if isinstance(first, str):  # MSD: {"0": "background", ...}
        return {str(int(k)): v for k, v in labels.items()}
    out = {}
    for name, value in labels.items():  # nnU-Net v2: {"background": 0, ...}
        if not isinstance(value, int):
            raise InputError(path, f"label {name!r}: region-based labels are not supported")
        out[str(value)] = name
    return out


def discover_decathlon(root: Path) -> DatasetSpec:
    """Read ``dataset.json`` (MSD or nnU-Net v2 style) and list the training cases."""
    path = root / "dataset.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(path, f"cannot read dataset.json ({exc})") from exc
    labels = _labels_from_json(meta, path)
    problems: list[InputError] = []
    cases: list[Case] = []
    if "channel_names" in meta:  # nnU-Net v2
        modalities = [meta["channel_names"][k] for k in sorted(meta["channel_names"], key=int)]
        ending = meta.get("file_ending", ".nii.gz")
        names = sorted(
            {p.name[: -len(ending) - 5] for p in (root / "imagesTr").glob(f"*_0000{ending}")}
        )
        for name in names:
            images = [root / "imagesTr" / f"{name}_{c:04d}{ending}" for c in range(len(modalities))]
            label = root / "labelsTr" / f"{name}{ending}"
            absent = [p for p in images if not p.is_file()]
            if absent:
                problems.append(InputError(absent[0], "channel file missing for this case"))
                continue
            if not label.is_file():
                problems.append(InputError(images[0], f"no label for this case (expected {label})"))
                continue
            cases.append(Case(name, images, label))
    else:  # MSD
        named = meta.get("modality", {"0": "MR"})
        modalities = [named[k] for k in sorted(named, key=int)]
        for entry in meta.get("training", []):
            image = (root / entry["image"]).resolve()
            label = (root / entry["label"]).resolve() if entry.get("label") else None
            if not image.is_file():
                problems.append(InputError(image, "listed in dataset.json but missing"))
                continue
            if label is None or not label.is_file():
                problems.append(
                    InputError(image, f"no label for this case (expected {label or 'a label'})")
                )
                continue
            cases.append(Case(case_name(image), [image], label))
    if not cases:
        raise InputError(root, "no training cases found")
    return DatasetSpec(root, 3, modalities, labels, cases, problems)


def discover(root: Path | str) -> DatasetSpec:
    """The dataset at ``root``: Decathlon/nnU-Net if it has ``dataset.json``, else 2D folders."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "no such folder")
    if (root / "dataset.json").is_file():
        return discover_decathlon(root)
    return discover_2d(root)


@dataclass
class LoadedCase:
    """A case in memory: ``image`` ``[C, *S]`` raw values, ``label`` ``[1, *S]`` int64."""

    name: str
    image: Loaded
    label: np.ndarray


def load_case(case: Case, spec: DatasetSpec) -> LoadedCase:
    """Read and check one case: image channels agree in size, the label fits the image."""
    parts = [read_image(p) for p in case.images]
    first = parts[0]
    if first.ndim != spec.spatial_dims:
        raise InputError(first.path, f"expected a {spec.spatial_dims}D image, got {first.ndim}D")
    for part in parts[1:]:
        if part.spatial_shape != first.spatial_shape:
            raise InputError(
                part.path,
                f"size {part.spatial_shape} differs from {first.path} {first.spatial_shape}",
            )
    image = first
    if len(parts) > 1:
        image = Loaded(
            first.path,
            np.concatenate([p.array for p in parts]),
            first.spacing,
            first.affine,
            first.header,
            first.max_value,
        )
    if spec.spatial_dims == 2:
        image.array = match_picture_channels(image.array, len(spec.modalities))
    elif image.array.shape[0] != len(spec.modalities):
        raise InputError(
            image.path,
            f"{image.array.shape[0]} channels, but dataset.json names {len(spec.modalities)}",
        )
    if case.label is None:
        raise InputError(image.path, "no label for this case")
    label = read_label(case.label)
    if label.spatial_shape != image.spatial_shape:
        raise InputError(
            label.path,
            f"mask size {label.spatial_shape} does not match image {image.path} "
            f"size {image.spatial_shape}",
        )
    if image.ndim == 3 and not np.allclose(label.spacing, image.spacing, rtol=1e-3, atol=1e-4):
        raise InputError(
            label.path, f"spacing {label.spacing} differs from image spacing {image.spacing}"
        )
    top = int(label.array.max())
    if spec.spatial_dims == 3 and top >= spec.num_classes:
        raise InputError(
            label.path, f"holds class {top}, but the dataset has {spec.num_classes} classes"
        )
    return LoadedCase(case.name, image, label.array[None])


def match_picture_channels(array: np.ndarray, channels: int) -> np.ndarray:
    """Grey pictures are repeated to RGB and RGB averaged to grey when the model needs it."""
    if array.shape[0] == channels:
        return array
    if array.shape[0] == 1 and channels == 3:
        return np.repeat(array, 3, axis=0)
    if array.shape[0] == 3 and channels == 1:
        return array.mean(axis=0, keepdims=True)
    raise ValueError(f"cannot turn {array.shape[0]} picture channels into {channels}")


def load_cases(spec: DatasetSpec, cases: list[Case]) -> tuple[list[LoadedCase], list[InputError]]:
    """Load every case; a case that fails is returned as a problem and skipped."""
    loaded, problems = [], []
    for case in cases:
        try:
            loaded.append(load_case(case, spec))
        except InputError as exc:
            problems.append(exc)
    if spec.spatial_dims == 2 and loaded:
        # Picture masks carry no class names: every index that occurs becomes a class.
        top = max(int(c.label.max()) for c in loaded)
        if top > 1:
            spec.labels = {str(k): "background" if k == 0 else f"class {k}" for k in range(top + 1)}
    return loaded, problems


def kfold_splits(names: list[str], folds: int, seed: int = 0) -> list[dict[str, list[str]]]:
    """``folds`` disjoint validation sets covering ``names`` (nnU-Net's ``splits_final.json``).

    Names are shuffled with ``seed`` and dealt into folds of near-equal size; fold ``i``
    trains on the other folds. Returns ``[{"train": [...], "val": [...]}, ...]``.
    """
    if folds < 2:
        raise ValueError("k-fold needs at least 2 folds")
    if len(names) < folds:
        raise ValueError(f"{len(names)} cases cannot fill {folds} folds")
    order = sorted(names)
    np.random.default_rng(seed).shuffle(order)
    chunks = np.array_split(np.asarray(order, dtype=object), folds)
    out = []
    for i in range(folds):
        val = sorted(str(n) for n in chunks[i])
        train = sorted(n for n in names if n not in set(val))
        out.append({"train": train, "val": val})
    return out
