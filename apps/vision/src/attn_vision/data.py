"""Images from disk: file discovery, decoding with named errors, ImageFolder and CSV datasets.

Datasets return ``(transform(image), label)``; the transforms are timm's
(``timm.data.create_transform``) resolved from the model's ``pretrained_cfg``.

* ImageFolder: ``ROOT/<class name>/<image>``; classes are the sorted sub-folder names.
* CSV: a header with ``path`` and ``label`` columns; relative paths are relative to the
  CSV's folder; classes are the sorted distinct labels unless given.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


class BadImageError(ValueError):
    """An image that cannot be read; the message names the file and the problem."""


def load_image(path: str | Path) -> Image.Image:
    """Decode ``path`` to an RGB image, or raise :class:`BadImageError` naming it."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError:
        raise BadImageError(f"{path}: no such file") from None
    except UnidentifiedImageError:
        raise BadImageError(f"{path}: not an image PIL can read") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadImageError(f"{path}: cannot decode ({exc})") from None


def find_images(paths: Iterable[str | Path]) -> list[Path]:
    """Image files named in ``paths``: files as given, folders searched recursively (by
    extension, sorted). A path that does not exist raises ``FileNotFoundError``."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(
                f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
            )
        elif p.exists():
            found.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return found


class LabeledImages(Dataset):
    """``(transform(image), class index)`` pairs from a list of ``(path, class index)``."""

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        classes: Sequence[str],
        transform: Callable[[Image.Image], Any] | None = None,
    ):
        self.samples = list(samples)
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        path, label = self.samples[i]
        image = load_image(path)
        return (self.transform(image) if self.transform else image), label

    def sample_path(self, i: int) -> str:
        return str(self.samples[i][0])

    def targets(self) -> list[int]:
        return [label for _, label in self.samples]


def image_folder(
    root: str | Path,
    transform: Callable | None = None,
    classes: Sequence[str] | None = None,
) -> LabeledImages:
    """``ROOT/<class>/<image>``. With ``classes`` given (a trained model's), folders must be
    among them and indices follow that order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    folders = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not folders:
        raise ValueError(f"{root}: no class sub-folders (expected ROOT/<class>/<image>)")
    classes = list(classes) if classes is not None else folders
    unknown = sorted(set(folders) - set(classes))
    if unknown:
        raise ValueError(f"{root}: folders that are not classes of the model: {unknown}")
    index = {c: i for i, c in enumerate(classes)}
    samples = [
        (f, index[d])
        for d in folders
        for f in sorted((root / d).rglob("*"))
        if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
    ]
    if not samples:
        raise ValueError(f"{root}: no images in the class folders")
    return LabeledImages(samples, classes, transform)


def csv_images(
    path: str | Path,
    transform: Callable | None = None,
    classes: Sequence[str] | None = None,
) -> LabeledImages:
    """A CSV with ``path`` and ``label`` columns (labels are class names)."""
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: needs a header with 'path' and 'label' columns")
        rows = [(r["path"], r["label"]) for r in reader]
    if not rows:
        raise ValueError(f"{path}: no rows")
    labels = sorted({label for _, label in rows})
    classes = list(classes) if classes is not None else labels
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise ValueError(f"{path}: labels that are not classes of the model: {unknown}")
    index = {c: i for i, c in enumerate(classes)}
    samples = [
        (p if (p := Path(file)).is_absolute() else path.parent / p, index[label])
        for file, label in rows
    ]
    return LabeledImages(samples, classes, transform)


def labeled_dataset(
    spec: str | Path, transform: Callable | None = None, classes: Sequence[str] | None = None
) -> LabeledImages:
    """An ImageFolder (a folder) or a CSV file (``*.csv``)."""
    spec = Path(spec)
    if spec.suffix.lower() == ".csv":
        return csv_images(spec, transform, classes)
    return image_folder(spec, transform, classes)
