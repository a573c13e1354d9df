"""Pictures of attention: head-averaged maps over the input image, with BiFormer's routed
regions outlined (query region cyan, routed regions yellow)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from attn_vision.attention_maps import QueryAttention


def to_display(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised ``[3, H, W]`` model input back to an ``[H, W, 3]`` image in ``[0, 1]``."""
    img = image.detach().cpu().float() * torch.tensor(std)[:, None, None]
    img = img + torch.tensor(mean)[:, None, None]
    return img.clamp(0, 1).permute(1, 2, 0).numpy()


def draw_attention(
    ax,
    image: np.ndarray,
    qa: QueryAttention,
    grid: tuple[int, int],
    *,
    title: str = "",
) -> None:
    """Overlay ``qa`` (head average) on ``image``; ``grid`` is the layer's token grid."""
    from matplotlib.patches import Rectangle

    H, W = image.shape[:2]
    sy, sx = H / grid[0], W / grid[1]
    heat = qa.probs.float().mean(0).numpy()
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
    ax.imshow(heat / max(heat.max(), 1e-12), cmap="inferno", alpha=0.55, extent=(0, W, H, 0))

    def rect(box, colour, width):
        top, left, h, w = box
        ax.add_patch(
            Rectangle(
                (left * sx, top * sy), w * sx, h * sy, fill=False, edgecolor=colour, linewidth=width
            )
        )

    for box in qa.routed_regions:
        rect(box, "yellow", 1.5)
    if qa.query_region is not None:
        rect(qa.query_region, "cyan", 2.5)
    y, x = qa.query
    ax.plot((x + 0.5) * sx, (y + 0.5) * sy, marker="*", color="cyan", markersize=14,
            markeredgecolor="black")  # fmt: skip
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def attention_figure(
    image: np.ndarray,
    rows: Sequence[tuple[str, tuple[int, int], Sequence[QueryAttention]]],
    path: str | Path,
    *,
    suptitle: str = "",
) -> Path:
    """One row per layer ``(name, grid, [QueryAttention per query])``, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows = len(rows)
    n_cols = max(len(r[2]) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.2 * n_cols, 3.3 * n_rows), squeeze=False)
    for i, (name, grid, queries) in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i, j]
            if j >= len(queries):
                ax.axis("off")
                continue
            qa = queries[j]
            extra = ""
            if qa.outside is not None:
                extra = f", {float(qa.outside.mean()):.0%} beyond border"
            draw_attention(ax, image, qa, grid, title=f"{name}\n{grid[0]}x{grid[1]} tokens{extra}")
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
