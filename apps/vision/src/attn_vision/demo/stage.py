"""attn-demo stage of attn_vision: a small BiFormer reading handwritten digits.

The model ships with the package (``demo/digits_biformer``, trained by the recipe in
:mod:`attn_vision.demo.digits` on scikit-learn's digits). The stage classifies the held-out
fifth of the digits it never trained on, and photographs from ``skimage.data``, which are
not digits: the model must still answer with one, so those predictions show how a closed-set
classifier behaves out of its domain, not a recognition result. For both it draws where the
Bi-Level Routing Attention of the first two stages routes a query region and how the query
token's attention spreads inside the routed regions.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from attn_vision.commands.attention_map import layer_maps
from attn_vision.commands.common import eval_transform
from attn_vision.demo.digits import SHIPPED, split_indices
from core_attention.demo.stage import Artifact, Stage, StageContext, StageResult

LAYERS = ["stages.0.blocks.0.attn", "stages.1.blocks.0.attn"]
PHOTOS = ("camera", "coins", "astronaut", "coffee")


def load_demo_model() -> torch.nn.Module:
    from attn_vision.checkpoint import create_model

    if not (SHIPPED / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{SHIPPED}: the demo model is missing; run python -m attn_vision.demo.digits --ship"
        )
    return create_model(str(SHIPPED)).float().eval()


def held_out_digits() -> tuple[list[Image.Image], np.ndarray]:
    """The digits of the recipe's validation split, as the PNGs it trained from."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    val = split_indices(digits.target, 0.2, seed=0)
    images = [
        Image.fromarray(np.round(im * (255 / 16)).astype(np.uint8), mode="L").convert("RGB")
        for im in digits.images[val]
    ]
    return images, digits.target[val]


def photos() -> list[tuple[str, Image.Image]]:
    from skimage import data

    out = []
    for name in PHOTOS:
        img = getattr(data, name)()
        pil = Image.fromarray(img)
        out.append((name, pil.convert("RGB")))
    return out


def _predict(model, transform, images):
    x = torch.stack([transform(im) for im in images])
    with torch.no_grad():
        return x, model(x).softmax(-1)


def _gallery(images, labels, probs, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pred = probs.argmax(-1)
    order = list(np.flatnonzero(pred.numpy() != labels))[:6]
    order += [i for i in range(len(labels)) if i not in order][: 24 - len(order)]
    fig, axes = plt.subplots(3, 8, figsize=(12, 5.4))
    for ax, i in zip(axes.flat, order):
        ax.imshow(np.asarray(images[i])[..., 0], cmap="gray_r")
        ok = int(pred[i]) == int(labels[i])
        ax.set_title(
            f"{int(pred[i])} ({float(probs[i].max()):.0%})" + ("" if ok else f"\ntrue {labels[i]}"),
            color="black" if ok else "red",
            fontsize=10,
        )
        ax.axis("off")
    fig.suptitle("Held-out digits: prediction (confidence); errors in red, shown first")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(ctx: StageContext) -> StageResult:
    from attn_vision.plots import attention_figure, to_display

    torch.manual_seed(ctx.seed)
    model = load_demo_model()
    transform = eval_transform(model)
    cfg = model.pretrained_cfg
    mean, std = cfg["mean"], cfg["std"]

    images, labels = held_out_digits()
    _, probs = _predict(model, transform, images)
    pred = probs.argmax(-1).numpy()
    accuracy = float((pred == labels).mean())
    per_class = [
        (d, int((labels == d).sum()), float((pred[labels == d] == d).mean())) for d in range(10)
    ]
    gallery = ctx.out_dir / "digits.png"
    _gallery(images, labels, probs, gallery)

    points = [(0.5, 0.5), (0.3, 0.6)]
    artifacts = [
        Artifact("image", "Held-out digits and the model's answers.", path=gallery),
        Artifact(
            "table",
            f"Accuracy on the {len(labels)} held-out digits, per class.",
            rows=[("digit", "images", "accuracy")]
            + [(d, n, f"{a:.1%}") for d, n, a in per_class]
            + [("all", len(labels), f"{accuracy:.1%}")],
        ),
    ]
    for k, i in enumerate([int(np.flatnonzero(labels == d)[0]) for d in (3, 8)]):
        x = transform(images[i])[None]
        rows = layer_maps(model, x, LAYERS, points)
        path = attention_figure(
            to_display(x[0], mean, std),
            rows,
            ctx.out_dir / f"digit_attention_{k}.png",
            suptitle=f"held-out digit {labels[i]}: predicted {pred[i]} "
            f"({float(probs[i].max()):.0%})",
        )
        artifacts.append(
            Artifact(
                "image",
                "Bi-Level Routing Attention on a held-out digit: for the query token (star) "
                "the cyan box is its region, yellow boxes the regions it is routed to, the "
                "heat its attention (head average). Stage 1: 8x8 tokens in 4x4 regions of "
                "2x2; stage 2: 4x4 tokens, one per region.",
                path=path,
            )
        )

    rows_table = [("image", "answer (a digit is forced)", "confidence")]
    for name, photo in photos():
        x = transform(photo)[None]
        with torch.no_grad():
            p = model(x).softmax(-1)[0]
        rows_table.append((f"skimage.data.{name}", str(int(p.argmax())), f"{float(p.max()):.0%}"))
        if name == "camera":
            path = attention_figure(
                to_display(x[0], mean, std),
                layer_maps(model, x, LAYERS, points),
                ctx.out_dir / "photo_attention.png",
                suptitle="skimage.data.camera, downscaled to 32x32: not a digit",
            )
            artifacts.append(
                Artifact(
                    "image",
                    "The same layers on a photograph the model was never meant to read: the "
                    "routing still picks the regions whose mean key best matches the query "
                    "region's mean query.",
                    path=path,
                )
            )
    artifacts.append(
        Artifact(
            "table",
            "Photographs from skimage.data are out of domain: the answer is a forced choice "
            "among the ten digits.",
            rows=rows_table,
        )
    )
    artifacts.append(
        Artifact(
            "text",
            text=(
                "Model: BiFormer with 4 stages of (1, 1, 2, 1) blocks, widths 16-128, "
                "4x4 routing regions, trained for 300 steps on the other "
                f"{1797 - len(labels)} scikit-learn digits upsampled to 32x32 "
                "(python -m attn_vision.demo.digits). No ImageNet weights "
                "are used: the official BiFormer checkpoints load with "
                "attn-vision --checkpoint biformer_tiny_in1k.pth when available."
            ),
        )
    )
    return StageResult(
        summary=f"digits BiFormer: {accuracy:.1%} on {len(labels)} held-out digits",
        artifacts=artifacts,
    )


STAGE = Stage(
    name="vision",
    title="attn_vision: a small BiFormer reading handwritten digits",
    description=(
        "A BiFormer trained by the package's recipe on scikit-learn's digits classifies "
        "digits it has not seen and shows where its routing attention looks."
    ),
    run=run,
    order=30,
)
