"""Reading images, label maps and volumes through MONAI's readers; writing masks back.

2D pictures (PNG, JPG, BMP, TIFF) load through ``monai.data.PILReader`` as
``[C, H, W]`` (row-major, the layout the file shows on screen); NIfTI volumes load
through ``monai.data.NibabelReader`` as ``[C, X, Y, Z]`` in the file's voxel order, with
the affine and the voxel spacing (millimetres) kept so that masks can be written back in
the same geometry. Every problem raises :class:`InputError`, whose message names the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VOLUME_SUFFIXES = (".nii.gz", ".nii")


class InputError(ValueError):
    """A file that cannot be used: the message is ``"<path>: <problem>"``."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def suffix_of(path: Path | str) -> str:
    """The file's format suffix, ``.nii.gz`` counted as one."""
    name = Path(path).name.lower()
    for suffix in VOLUME_SUFFIXES + IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return Path(path).suffix.lower()


def case_name(path: Path | str) -> str:
    """File name without its format suffix (``case_01.nii.gz`` -> ``case_01``)."""
    name = Path(path).name
    suffix = suffix_of(path)
    return name[: -len(suffix)] if suffix and name.lower().endswith(suffix) else name


def is_volume(path: Path | str) -> bool:
    return suffix_of(path) in VOLUME_SUFFIXES


def is_supported(path: Path | str) -> bool:
    return suffix_of(path) in IMAGE_SUFFIXES + VOLUME_SUFFIXES


@dataclass
class Loaded:
    """One file's pixels and geometry.

    ``array`` is ``[C, *spatial]`` for images and ``[*spatial]`` (integers) for label maps.
    ``spacing`` is the size of a pixel/voxel along each spatial axis (mm for NIfTI, 1.0 per
    pixel for pictures); ``affine``/``header`` are the NIfTI ones (``None`` for pictures);
    ``max_value`` is the largest value the picture's integer type holds (255 for 8-bit).
    """

    path: Path
    array: np.ndarray
    spacing: tuple[float, ...]
    affine: np.ndarray | None = None
    header: object | None = None
    max_value: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[-len(self.spacing) :])

    @property
    def ndim(self) -> int:
        return len(self.spacing)


def _pil_converter(image):
    # Palette, alpha and CMYK pictures become plain RGB/grey; 16-bit grey stays 16-bit.
    if image.mode in ("P", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
        return image.convert("RGB")
    if image.mode == "LA":
        return image.convert("L")
    if image.mode == "1":
        return image.convert("L")
    return image


def _read_picture(path: Path) -> tuple[np.ndarray, float]:
    """``[H, W]`` or ``[H, W, C]`` pixel array and its integer type's maximum."""
    from monai.data import PILReader

    reader = PILReader(converter=_pil_converter, reverse_indexing=False)
    try:
        data, _ = reader.get_data(reader.read(str(path)))
    except Exception as exc:
        raise InputError(path, f"cannot read the picture ({type(exc).__name__}: {exc})") from exc
    data = np.asarray(data)
    if np.issubdtype(data.dtype, np.integer):
        max_value = float(np.iinfo(data.dtype).max)
    elif data.dtype == np.bool_:
        max_value = 1.0
    else:
        max_value = float(data.max()) if data.size else 1.0
    return data, max_value


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, object]:
    """Voxel array in file order (``[X, Y, Z]`` or ``[X, Y, Z, C]``), affine and header."""
    from monai.data import NibabelReader

    reader = NibabelReader()
    try:
        image = reader.read(str(path))
        data, meta = reader.get_data(image)
        header = image.header.copy()
    except Exception as exc:
        raise InputError(path, f"cannot read the NIfTI file ({type(exc).__name__}: {exc})") from exc
    affine = np.asarray(meta["original_affine"], dtype=np.float64)
    return np.asarray(data), affine, header


def _spacing_from_affine(affine: np.ndarray) -> tuple[float, ...]:
    return tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))


def _check_spatial(path: Path, shape: tuple[int, ...]) -> None:
    if any(s < 2 for s in shape):
        raise InputError(path, f"spatial size {tuple(shape)} is too small (2 or more per axis)")


def read_image(path: Path | str) -> Loaded:
    """An image as ``[C, *spatial]`` float32 in its file's value range.

    Pictures give ``[1 or 3, H, W]``; NIfTI gives ``[C, X, Y, Z]`` (a 4D file's last axis
    holds the channels, as in the Medical Segmentation Decathlon).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    if is_volume(path):
        data, affine, header = _read_nifti(path)
        if data.ndim == 3:
            data = data[None]
        elif data.ndim == 4:
            data = np.moveaxis(data, -1, 0)
        else:
            raise InputError(path, f"expected a 3D or 4D NIfTI volume, got {data.ndim}D")
        _check_spatial(path, data.shape[1:])
        array = data.astype(np.float32)
        if not np.isfinite(array).all():
            raise InputError(path, "the volume holds NaN or infinite values")
        return Loaded(path, array, _spacing_from_affine(affine), affine=affine, header=header)
    if suffix_of(path) not in IMAGE_SUFFIXES:
        raise InputError(path, f"unsupported format (use {', '.join(IMAGE_SUFFIXES)} or .nii.gz)")
    data, max_value = _read_picture(path)
    if data.ndim == 2:
        data = data[None]
    elif data.ndim == 3:
        data = np.moveaxis(data, -1, 0)
    else:
        raise InputError(path, f"expected a grey or RGB picture, got array shape {data.shape}")
    _check_spatial(path, data.shape[1:])
    return Loaded(path, data.astype(np.float32), (1.0, 1.0), max_value=max_value)


def _as_label_map(path: Path, data: np.ndarray) -> np.ndarray:
    if not np.isfinite(data).all():
        raise InputError(path, "the label map holds NaN or infinite values")
    if not np.array_equal(data, np.round(data)):
        raise InputError(path, "the label map holds non-integer values")
    if data.min() < 0:
        raise InputError(path, f"the label map holds negative values ({data.min():g})")
    return data.astype(np.int64)


def read_label(path: Path | str) -> Loaded:
    """A label map as ``[*spatial]`` int64 class indices.

    Binary picture masks (values 0 and 255, or 0 and 1) become 0/1; other pictures are
    read as class indices (at most 100). RGB masks must be grey (all three channels equal).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    if is_volume(path):
        data, affine, header = _read_nifti(path)
        if data.ndim == 4 and data.shape[-1] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise InputError(path, f"expected a 3D label volume, got array shape {data.shape}")
        _check_spatial(path, data.shape)
        labels = _as_label_map(path, data)
        return Loaded(path, labels, _spacing_from_affine(affine), affine=affine, header=header)
    if suffix_of(path) not in IMAGE_SUFFIXES:
        raise InputError(path, f"unsupported format (use {', '.join(IMAGE_SUFFIXES)} or .nii.gz)")
    data, max_value = _read_picture(path)
    if data.ndim == 3:
        if not (data == data[..., :1]).all():
            raise InputError(path, "the mask is a colour picture; masks must be grey")
        data = data[..., 0]
    if data.ndim != 2:
        raise InputError(path, f"expected a 2D mask, got array shape {data.shape}")
    _check_spatial(path, data.shape)
    labels = _as_label_map(path, data)
    values = np.unique(labels)
    if values.max() == 255 and set(values.tolist()) <= {0, 255}:
        labels = (labels > 0).astype(np.int64)
    elif values.max() > 100:
        raise InputError(
            path,
            f"{len(values)} distinct values up to {values.max()}: neither a binary 0/255 mask "
            "nor class indices (a JPEG-compressed or anti-aliased mask?)",
        )
    return Loaded(path, labels, (1.0, 1.0), max_value=max_value)


def write_mask(mask: np.ndarray, like: Loaded, out_path: Path, num_classes: int) -> Path:
    """Write a label map ``[*spatial]`` in ``like``'s format and geometry.

    NIfTI masks keep the input's affine, qform/sform and spacing (uint8 voxels). Picture
    masks are PNG (lossless; a JPEG mask would not hold exact labels): 0/255 for a binary
    model, class indices otherwise. The file is written beside and then renamed over
    ``out_path`` so a reader never sees half of it.
    """
    import nibabel as nib
    from PIL import Image

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if tuple(mask.shape) != like.spatial_shape:
        raise ValueError(f"mask shape {mask.shape} differs from {like.path}'s {like.spatial_shape}")
    tmp = out_path.with_name(f".{out_path.name}.tmp{suffix_of(out_path)}")
    if like.affine is not None:
        header = like.header.copy() if like.header is not None else None
        image = nib.Nifti1Image(mask.astype(np.uint8), like.affine, header=header)
        image.set_data_dtype(np.uint8)
        image.header.set_slope_inter(1.0, 0.0)
        if header is not None:
            image.set_qform(like.affine, code=int(header["qform_code"]) or 1)
            image.set_sform(like.affine, code=int(header["sform_code"]) or 1)
        nib.save(image, str(tmp))
    else:
        values = mask.astype(np.uint8) * 255 if num_classes == 2 else mask.astype(np.uint8)
        Image.fromarray(values).save(tmp, format="PNG")
    tmp.replace(out_path)
    return out_path
