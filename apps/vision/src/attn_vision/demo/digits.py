"""The demo model's recipe: a small BiFormer trained by ``attn-vision train`` on scikit-learn's
handwritten digits (1797 real 8x8 scans, shipped with scikit-learn), upsampled to 32x32.

``python -m attn_vision.demo.digits --output-dir runs/digits`` writes the digits as an
ImageFolder (a fixed, stratified 80/20 split), trains with the options in
:data:`RECIPE`, evaluates on the held-out fifth and, with ``--ship``, stores the result in
float16 as this package's ``demo/digits_biformer`` folder (what the demo stage loads).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

SHIPPED = Path(__file__).with_name("digits_biformer")
INPUT_SIZE = 32

# A BiFormer with BiFormer-T's stage layout, shrunk: 4 routing regions per side, so the
# 8x8-token first stage routes 2x2-token regions.
MODEL_KWARGS = {
    "depths": (1, 1, 2, 1),
    "embed_dims": (16, 32, 64, 128),
    "head_dim": 16,
    "n_win": 4,
    "topks": (1, 4, 4, -2),
}

RECIPE = [
    "--model", "biformer_tiny",
    "--img-size", str(INPUT_SIZE),
    "--val-split", "0",
    # digits are centred and not mirror-symmetric: mild crops, no flips or erasing
    "--scale", "0.7", "1.0", "--hflip", "0", "--reprob", "0", "--color-jitter", "0",
    "--aa", "", "--mixup", "0", "--cutmix", "0", "--smoothing", "0.05",
    "--drop-path", "0.0",
    "--batch-size", "32", "--lr", "2e-3", "--weight-decay", "0.05",
    "--warmup-steps", "10", "--min-lr", "1e-5", "--sched", "cosine",
    "--num-workers", "0", "--save-every", "100", "--log-every", "10",
]  # fmt: skip


def model_kwargs_args() -> list[str]:
    """:data:`MODEL_KWARGS` as ``--model-kwargs`` arguments."""
    return ["--model-kwargs", *(f"{k}={v!r}" for k, v in MODEL_KWARGS.items())]


def split_indices(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the validation samples: ``val_fraction`` of each class, at random."""
    rng = np.random.default_rng(seed)
    val = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        val[rng.permutation(idx)[: round(len(idx) * val_fraction)]] = True
    return val


def write_digits(root: str | Path, *, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write ``ROOT/train/<digit>/<i>.png`` and ``ROOT/val/<digit>/<i>.png`` (8x8 grey)."""
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    val = split_indices(digits.target, val_fraction, seed)
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = root / ("val" if val[i] else "train") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.round(image * (255 / 16)).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png")
    return root


def train_args(data: Path, output_dir: Path, max_steps: int, seed: int = 0) -> list[str]:
    return [
        "train",
        str(data / "train"),
        *RECIPE,
        *model_kwargs_args(),
        "--max-steps", str(max_steps),
        "--output-dir", str(output_dir),
        "--seed", str(seed),
    ]  # fmt: skip


def ship(model_folder: Path, target: Path = SHIPPED) -> Path:
    """Copy a trained model folder into the package with float16 weights."""
    from safetensors.torch import load_file, save_file

    target.mkdir(parents=True, exist_ok=True)
    weights = load_file(model_folder / "model.safetensors")
    half = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    save_file(half, target / "model.safetensors")
    shutil.copy(model_folder / "config.json", target / "config.json")
    return target


def main(argv: list[str] | None = None) -> int:
    from attn_vision.cli import main as cli

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/digits"))
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ship", action="store_true", help="store the model in the package")
    args = parser.parse_args(argv)
    data = write_digits(args.output_dir / "data")
    run = args.output_dir / "run"
    cli([*train_args(data, run, args.max_steps, args.seed), "--overwrite", "--resume", "none"])
    cli([
        "eval", str(data / "val"), "--model", str(run / "final"),
        "--output-dir", str(args.output_dir / "eval"), "--overwrite",
    ])  # fmt: skip
    metrics = json.loads((args.output_dir / "eval" / "metrics.json").read_text())
    print(f"held-out digits: top-1 {metrics['top1']:.4f}")
    if args.ship:
        print(f"shipped to {ship(run / 'final')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
