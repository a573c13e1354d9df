"""PNG overlays of 2D masks on their images: tinted regions with outlined boundaries."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from attn_medical.io import Loaded

# Class colours (RGB) for classes 1, 2, ...; cycled when there are more classes.
PALETTE = np.array(
    [[0, 255, 0], [255, 0, 255], [0, 200, 255], [255, 200, 0], [255, 80, 80]], dtype=np.float64
)


def display_rgb(image: Loaded) -> np.ndarray:
    """``[H, W, 3]`` uint8 view of a picture ``[C, H, W]`` in its own value range."""
    array = image.array
    top = image.max_value or max(float(array.max()), 1.0)
    rgb = np.repeat(array, 3, axis=0) if array.shape[0] == 1 else array[:3]
    return np.clip(rgb.transpose(1, 2, 0) / top * 255, 0, 255).astype(np.uint8)


def boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it."""
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def overlay(rgb: np.ndarray, labels: np.ndarray, alpha: float = 0.35) -> np.ndarray:
    """Tint each class region and draw its outline in the class colour."""
    out = rgb.astype(np.float64)
    for k in range(1, int(labels.max()) + 1):
        region = labels == k
        if not region.any():
            continue
        colour = PALETTE[(k - 1) % len(PALETTE)]
        out[region] = (1 - alpha) * out[region] + alpha * colour
        out[boundary(region)] = colour
    return out.astype(np.uint8)


def write_overlay(image: Loaded, labels: np.ndarray, path: Path) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay(display_rgb(image), labels)).save(path)
    return path
