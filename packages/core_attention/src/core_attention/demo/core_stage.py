"""Core stage of ``attn-demo``: global vs blocked-local attention maps on a photograph.

The image (``skimage.data.astronaut``) is cut into 8x8-pixel patches; each patch becomes a
token whose features are its colour and texture statistics. Both mechanisms run through
``core_attention.attention`` with ``v`` set to the identity, so the output rows are the
attention probabilities themselves:

* global attention: every patch may attend to every patch;
* blocked local attention (HaloNet, Vaswani et al. 2021): queries in 4x4-patch blocks
  attend only to their block plus a halo of 2 patches around it.
"""

from __future__ import annotations

import numpy as np
import torch

from core_attention.demo.stage import Artifact, Stage, StageContext, StageResult
from core_attention.functional import attention

PATCH = 8
BLOCK = 4
HALO = 2
SIZE = 256  # image side in pixels after resizing
QUERIES = ((6, 15), (20, 22), (27, 8))  # (row, col) in patches: face, helmet, suit/background


def patch_features(image: np.ndarray) -> torch.Tensor:
    """``[H/8 * W/8, 7]`` unit-length standardised colour mean/std and gradient energy per patch."""
    img = image.astype(np.float64) / 255.0
    gy, gx = np.gradient(img.mean(axis=2))
    grad = np.hypot(gx, gy)
    g = SIZE // PATCH
    patches = img.reshape(g, PATCH, g, PATCH, 3).transpose(0, 2, 1, 3, 4).reshape(g * g, -1, 3)
    gpatch = grad.reshape(g, PATCH, g, PATCH).transpose(0, 2, 1, 3).reshape(g * g, -1)
    feats = np.concatenate([patches.mean(1), patches.std(1), gpatch.mean(1, keepdims=True)], axis=1)
    feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-8)
    # Unit length, so the logits are cosine similarities: a patch attends to patches that
    # look like it rather than to the patches with the largest features.
    feats /= np.linalg.norm(feats, axis=1, keepdims=True) + 1e-8
    return torch.from_numpy(feats).float()


def local_block_mask(grid: int, block: int, halo: int) -> torch.Tensor:
    """Boolean ``[N, N]``: query patch may see key patch within its block's halo window."""
    rows = torch.arange(grid).repeat_interleave(grid)
    cols = torch.arange(grid).repeat(grid)
    qb_r, qb_c = rows // block * block, cols // block * block  # block origin of each query
    in_r = (rows[None, :] >= qb_r[:, None] - halo) & (rows[None, :] < qb_r[:, None] + block + halo)
    in_c = (cols[None, :] >= qb_c[:, None] - halo) & (cols[None, :] < qb_c[:, None] + block + halo)
    return in_r & in_c


def attention_maps(feats: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Attention probabilities ``[N, N]`` of tokens ``feats`` ``[N, d]``, via v = identity."""
    n = feats.shape[0]
    q = feats[None, None]
    eye = torch.eye(n)[None, None]
    return attention(q, q, eye, attn_mask=mask, scale=scale, backend="torch")[0, 0]


def _entropy(p: torch.Tensor) -> float:
    return float(-(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean())


def _mean_distance(p: torch.Tensor, grid: int) -> float:
    """Mean query-to-key distance in patches, weighted by attention."""
    rc = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij"), -1)
    rc = rc.reshape(-1, 2).float()
    dist = torch.cdist(rc, rc)
    return float((p * dist).sum(-1).mean())


def run(ctx: StageContext) -> StageResult:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage import data
    from skimage.transform import resize

    image = (resize(data.astronaut(), (SIZE, SIZE), anti_aliasing=True) * 255).astype(np.uint8)
    grid = SIZE // PATCH
    feats = patch_features(image)
    scale = 12.0  # sharpness of the cosine-similarity softmax
    maps = {
        "global attention": attention_maps(feats, None, scale),
        f"blocked local attention (block {BLOCK}, halo {HALO})": attention_maps(
            feats, local_block_mask(grid, BLOCK, HALO), scale
        ),
    }

    fig, axes = plt.subplots(len(maps), len(QUERIES), figsize=(4 * len(QUERIES), 4.2 * len(maps)))
    for row, (name, p) in enumerate(maps.items()):
        for col, (qr, qc) in enumerate(QUERIES):
            ax = axes[row, col]
            heat = p[qr * grid + qc].reshape(grid, grid).numpy()
            ax.imshow(image)
            ax.imshow(
                np.kron(heat / heat.max(), np.ones((PATCH, PATCH))),
                cmap="inferno",
                alpha=0.6,
                extent=(0, SIZE, SIZE, 0),
            )
            ax.plot(
                (qc + 0.5) * PATCH,
                (qr + 0.5) * PATCH,
                marker="*",
                color="cyan",
                markersize=16,
                markeredgecolor="black",
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name, fontsize=11)
            if row == 0:
                ax.set_title(f"query patch ({qr}, {qc})")
    fig.suptitle("Where one query patch attends: global vs blocked local attention", fontsize=13)
    fig.tight_layout()
    figure = ctx.out_dir / "attention_maps.png"
    fig.savefig(figure, dpi=90)
    plt.close(fig)

    rows = [("mechanism", "keys per query", "mean entropy (nats)", "mean distance (patches)")]
    for name, p in maps.items():
        keys = int((p > 0).sum(-1).float().mean())
        rows.append((name, keys, f"{_entropy(p):.2f}", f"{_mean_distance(p, grid):.1f}"))
    g_dist, l_dist = float(rows[1][3]), float(rows[2][3])
    return StageResult(
        summary=f"attention maps of {grid * grid} patch tokens; mean reach {g_dist:.1f} "
        f"(global) vs {l_dist:.1f} patches (local)",
        artifacts=[
            Artifact(
                "image",
                "Attention probabilities of three query patches (star), overlaid on the image.",
                path=figure,
            ),
            Artifact("table", "Statistics over all query patches.", rows=rows),
        ],
    )


STAGE = Stage(
    name="core",
    title="core_attention: global vs blocked local attention",
    description=(
        "Where patches of a photograph attend: global attention sees the whole image, "
        "HaloNet-style blocked local attention only a window around each block."
    ),
    run=run,
    order=0,
)
