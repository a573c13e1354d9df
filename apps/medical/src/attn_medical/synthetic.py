"""Offline synthetic data with exact masks: 2D wound photographs and 3D NIfTI volumes.

* :func:`wound_image`: a skin-like textured background (skin tone, low-frequency mottling,
  pores, hairs), one irregular lesion (a star-shaped outline with random harmonics) of
  granulation-red, pink, slough-yellow or necrotic-dark colour with interior blotches, a
  reddened rim around it that is *not* part of the mask, then lighting (gradient and
  vignette), blur and sensor noise. The mask is the exact lesion outline.
* :func:`ellipsoid_volume`: randomly oriented ellipsoids (class 1) and spheres (class 2) of
  distinct mean intensity in a smooth bias field with Gaussian noise (MR-like).

``write_wounds`` and ``write_volumes`` lay these out as the trainers read them: a 2D
folder ``images/`` + ``masks/``, and the Medical Segmentation Decathlon layout
(``imagesTr/``, ``labelsTr/``, ``imagesTs/``, ``dataset.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy import ndimage

SKIN_TONES = np.array(
    [[236, 200, 178], [222, 178, 150], [198, 150, 118], [160, 112, 80], [112, 76, 54]],
    dtype=np.float64,
)
LESION_COLOURS = np.array(
    [[176, 36, 48], [214, 104, 118], [206, 184, 92], [64, 30, 32], [150, 52, 40]],
    dtype=np.float64,
)
VOLUME_LABELS = {"0": "background", "1": "ellipsoid", "2": "sphere"}


def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-filtered white noise."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-12)


def _lesion_mask(rng: np.random.Generator, h: int, w: int, radius: float, centre) -> np.ndarray:
    """Star-shaped region ``r < R(theta)`` with R a random sum of low harmonics."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dy, dx = yy - centre[0], xx - centre[1]
    theta = np.arctan2(dy, dx)
    outline = np.ones_like(theta)
    for k in range(2, 7):
        outline += rng.uniform(0, 0.3 / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    aspect = rng.uniform(0.7, 1.0)
    rot = rng.uniform(0, np.pi)
    u = dx * np.cos(rot) + dy * np.sin(rot)
    v = (-dx * np.sin(rot) + dy * np.cos(rot)) / aspect
    return np.hypot(u, v) < radius * np.clip(outline, 0.4, None)


def _skin(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    t = rng.uniform(0, len(SKIN_TONES) - 1)
    i = int(t)
    tone = SKIN_TONES[i] + (t - i) * (SKIN_TONES[min(i + 1, len(SKIN_TONES) - 1)] - SKIN_TONES[i])
    size = min(h, w)
    mottling = _smooth_noise(rng, (h, w), size / 8)[..., None] * rng.uniform(0.02, 0.06)
    grain = _smooth_noise(rng, (h, w), 0.8)[..., None] * rng.uniform(0.01, 0.03)
    redness = _smooth_noise(rng, (h, w), size / 6)[..., None] * np.array([0.03, -0.01, -0.01])
    skin = tone * (1 + mottling + grain + redness)
    pores = rng.random((h, w)) < rng.uniform(0.002, 0.01)
    skin[pores] *= 0.8
    for _ in range(rng.poisson(2)):  # hairs: short dark curved strokes
        y, x = rng.uniform(0, h), rng.uniform(0, w)
        angle = rng.uniform(0, 2 * np.pi)
        for _ in range(int(rng.uniform(0.1, 0.3) * size)):
            angle += rng.normal(0, 0.08)
            y, x = y + np.sin(angle), x + np.cos(angle)
            if 0 <= y < h and 0 <= x < w:
                skin[int(y), int(x)] *= 0.45
    return skin


def wound_image(
    rng: np.random.Generator, size: tuple[int, int] = (128, 128)
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic wound photograph: ``(image [H, W, 3] uint8, mask [H, W] uint8 0/1)``."""
    h, w = size
    skin = _skin(rng, h, w)
    radius = rng.uniform(0.12, 0.3) * min(h, w)
    centre = (rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w)
    mask = _lesion_mask(rng, h, w, radius, centre)
    if rng.random() < 0.25:  # a small satellite lesion
        r2 = rng.uniform(0.04, 0.08) * min(h, w)
        c2 = (rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w)
        mask |= _lesion_mask(rng, h, w, r2, c2)

    skin_tone = skin.reshape(-1, 3).mean(0)
    palette = [c for c in LESION_COLOURS if np.linalg.norm(c - skin_tone) > 70]
    main = palette[rng.integers(len(palette))] * rng.uniform(0.85, 1.15, 3)
    second = LESION_COLOURS[rng.integers(len(LESION_COLOURS))]
    blotch = (_smooth_noise(rng, (h, w), min(h, w) / 20) > rng.uniform(0.3, 1.2))[..., None]
    lesion = np.where(blotch, 0.6 * main + 0.4 * second, main)
    lesion = lesion * (1 + 0.08 * _smooth_noise(rng, (h, w), 1.0)[..., None])

    # Reddened rim outside the lesion: a distractor the network must not segment.
    dist_out = ndimage.distance_transform_edt(~mask)
    rim = np.exp(-dist_out / (rng.uniform(0.05, 0.15) * min(h, w)))[..., None] * (~mask)[..., None]
    skin = skin * (1 - 0.25 * rim) + np.array([200.0, 90.0, 90.0]) * 0.25 * rim

    image = np.where(mask[..., None], lesion, skin)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    gradient = 1 + rng.uniform(-0.25, 0.25) * (yy - 0.5) + rng.uniform(-0.25, 0.25) * (xx - 0.5)
    vignette = 1 - rng.uniform(0, 0.35) * ((yy - 0.5) ** 2 + (xx - 0.5) ** 2) * 2
    image = image * (rng.uniform(0.75, 1.15) * gradient * vignette)[..., None]
    blur = rng.uniform(0.0, 1.5)
    if blur > 0.3:
        image = ndimage.gaussian_filter(image, (blur, blur, 0))
    image = image + rng.normal(0, rng.uniform(1, 5), image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), mask.astype(np.uint8)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def ellipsoid_volume(
    rng: np.random.Generator, shape: tuple[int, int, int] = (48, 48, 48), spacing=(1.0, 1.0, 1.0)
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic volume: ``(image [X, Y, Z] float32, labels [X, Y, Z] uint8)``.

    Sizes are in millimetres (``spacing`` per voxel), so structures keep their physical
    shape under anisotropic spacing.
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1) * spacing
    extent = np.asarray(shape) * spacing
    labels = np.zeros(shape, dtype=np.uint8)
    for _ in range(rng.integers(1, 3)):  # ellipsoids
        centre = rng.uniform(0.3, 0.7, 3) * extent
        axes = rng.uniform(0.12, 0.25, 3) * extent.min()
        local = (grid - centre) @ _random_rotation(rng)
        labels[((local / axes) ** 2).sum(-1) < 1] = 1
    for _ in range(rng.integers(1, 3)):  # spheres
        centre = rng.uniform(0.2, 0.8, 3) * extent
        radius = rng.uniform(0.08, 0.13) * extent.min()
        labels[((grid - centre) ** 2).sum(-1) < radius**2] = 2
    means = {0: 100.0, 1: 100.0 + rng.uniform(50, 80), 2: 100.0 - rng.uniform(50, 80)}
    image = np.vectorize(means.get)(labels).astype(np.float64)
    image = ndimage.gaussian_filter(image, 0.6)
    bias = 1 + 0.15 * _smooth_noise(rng, shape, min(shape) / 4)
    image = image * bias + rng.normal(0, rng.uniform(10, 20), shape)
    return image.astype(np.float32), labels


def write_wounds(
    out: Path, count: int, size_range=(128, 128), seed: int = 0, overwrite: bool = False
) -> Path:
    """``out/images/wound_XXXX.png`` + ``out/masks/wound_XXXX.png`` (0/255)."""
    from PIL import Image

    out = Path(out)
    _check_out(out, overwrite)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lo, hi = size_range
    for i in range(count):
        h, w = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
        image, mask = wound_image(rng, (h, w))
        Image.fromarray(image).save(out / "images" / f"wound_{i:04d}.png")
        Image.fromarray(mask * 255).save(out / "masks" / f"wound_{i:04d}.png")
    return out


def write_volumes(
    out: Path,
    count: int,
    test_count: int = 0,
    shape=(48, 48, 48),
    spacing=(1.0, 1.0, 1.0),
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """A Decathlon-layout dataset of :func:`ellipsoid_volume` cases (modality MR)."""
    import nibabel as nib

    out = Path(out)
    _check_out(out, overwrite)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    training, test = [], []
    for i in range(count + test_count):
        image, labels = ellipsoid_volume(rng, tuple(shape), spacing)
        affine = np.diag([*spacing, 1.0])
        affine[:3, 3] = rng.uniform(-50, 50, 3)
        name = f"vol_{i:03d}.nii.gz"
        if i < count:
            nib.save(nib.Nifti1Image(image, affine), out / "imagesTr" / name)
            nib.save(nib.Nifti1Image(labels, affine), out / "labelsTr" / name)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            nib.save(nib.Nifti1Image(image, affine), out / "imagesTs" / name)
            test.append(f"./imagesTs/{name}")
    meta = {
        "name": "SyntheticEllipsoids",
        "description": "Ellipsoids and spheres in noise (attn-medical make-data volumes)",
        "tensorImageSize": "3D",
        "modality": {"0": "MR"},
        "labels": VOLUME_LABELS,
        "numTraining": count,
        "numTest": test_count,
        "training": training,
        "test": test,
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    if out.exists() and overwrite:
        import shutil

        shutil.rmtree(out)
