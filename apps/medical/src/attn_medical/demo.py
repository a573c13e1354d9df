"""Medical stage of ``attn-demo``: wound segmentation with the shipped 2D checkpoint.

Built-in synthetic wound photographs (drawn with a seed the checkpoint never trained on)
are segmented by the small attention residual U-Net shipped in
``attn_medical/weights/wound2d`` (trained by ``apps/medical/recipes/wound2d.sh``), with
Gaussian sliding-window inference where a photo is larger than the training patch. The
report shows each photo, its predicted outline against the exact one, the finest
attention gate's coefficients, and Dice, IoU and HD95 per photo.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from core_attention.demo.stage import Artifact, Stage, StageContext, StageResult

IMAGE_SIZES = ((128, 128), (112, 144), (160, 120), (136, 136), (120, 168), (150, 150))
SEED_OFFSET = 10_000  # the recipe's data uses seed 0


def checkpoint_dir() -> Path:
    """The shipped 2D wound checkpoint (``config.json`` + ``model.safetensors``)."""
    return Path(str(resources.files("attn_medical") / "weights" / "wound2d"))


def run(ctx: StageContext) -> StageResult:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from attn_medical.inference import Segmenter
    from attn_medical.io import Loaded
    from attn_medical.metrics import score_case
    from attn_medical.overlay import boundary, overlay
    from attn_medical.synthetic import wound_image
    from attn_medical.transforms import normalise

    segmenter = Segmenter.from_pretrained(checkpoint_dir(), device=ctx.device)
    rng = np.random.default_rng(ctx.seed + SEED_OFFSET)
    rows = [("photo", "size (px)", "Dice", "IoU", "HD95 (px)")]
    fig, axes = plt.subplots(len(IMAGE_SIZES), 3, figsize=(10, 3.3 * len(IMAGE_SIZES)))
    dices = []
    for i, size in enumerate(IMAGE_SIZES):
        picture, truth = wound_image(rng, size)
        array = picture.transpose(2, 0, 1).astype(np.float32)
        loaded = Loaded(Path(f"wound_{i}.png"), array, (1.0, 1.0), max_value=255.0)
        labels, _ = segmenter.segment(loaded)
        score = score_case(f"wound_{i}", labels, truth, 2, (1.0, 1.0))[0]
        dices.append(score.dice)
        rows.append(
            (
                f"wound_{i}",
                f"{size[0]}x{size[1]}",
                f"{score.dice:.3f}",
                f"{score.iou:.3f}",
                f"{score.hd95:.1f}",
            )
        )

        x = torch.from_numpy(normalise(loaded.array, segmenter.prep, 255.0))[None]
        with torch.no_grad():
            _, maps = segmenter.model(x.to(ctx.device), return_attention=True)
        attention = maps[0][0, 0].cpu().numpy()

        shown = overlay(picture, labels)
        shown[boundary(truth.astype(bool))] = (255, 255, 0)
        axes[i, 0].imshow(picture)
        axes[i, 0].set_title(f"photo {i} ({size[0]}x{size[1]})", fontsize=9)
        axes[i, 1].imshow(shown)
        axes[i, 1].set_title(
            f"prediction (green), truth (yellow): Dice {score.dice:.3f}", fontsize=9
        )
        axes[i, 2].imshow(attention, cmap="magma", vmin=0, vmax=1)
        axes[i, 2].set_title("attention coefficients, finest gate", fontsize=9)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("Attention residual U-Net on synthetic wound photographs", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    figure = ctx.out_dir / "wound_segmentation.png"
    fig.savefig(figure, dpi=80)
    plt.close(fig)

    params = sum(p.numel() for p in segmenter.model.parameters())
    patch = "x".join(str(p) for p in segmenter.prep.patch_size)
    return StageResult(
        summary=f"mean Dice {np.mean(dices):.3f} on {len(dices)} held-out synthetic wound photos "
        f"({params / 1e3:.0f}k-parameter 2D checkpoint, {patch} patches)",
        artifacts=[
            Artifact(
                "image",
                "Photos, predicted (green) and true (yellow) wound outlines, and the attention "
                "coefficients of the finest gate.",
                path=figure,
            ),
            Artifact("table", "Scores per photo (MONAI metrics; HD95 in pixels).", rows=rows),
        ],
    )


STAGE = Stage(
    name="medical",
    title="attn-medical: wound segmentation with an attention residual U-Net",
    description=__doc__.strip().splitlines()[0],
    run=run,
    order=50,
)
