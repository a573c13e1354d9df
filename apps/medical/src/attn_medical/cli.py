"""The ``attn-medical`` console script: ``train``, ``infer``, ``eval``, ``make-data``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from attn_medical import __version__
from core_attention.cli import AppCommandLine

CLI = AppCommandLine(
    prog="attn-medical",
    description="Attention residual U-Net segmentation in 2D and 3D.",
    version=__version__,
)


def _run_train(args: argparse.Namespace) -> int:
    from attn_medical.train import run_train

    return run_train(args)


def _add_train(cli: AppCommandLine) -> None:
    from attn_medical.train import add_arguments

    p = cli.add_command(
        "train", "train an attention residual U-Net (Dice + CE; runs under torchrun/accelerate)"
    )
    add_arguments(p)
    p.set_defaults(func=_run_train)


def _to_stderr(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def _run_infer(args: argparse.Namespace) -> int:
    from attn_medical.inference import Segmenter, infer_files
    from attn_medical.models import CheckpointError

    try:
        segmenter = Segmenter.from_pretrained(
            args.model,
            tta=args.tta,
            overlap=args.overlap,
            sw_batch_size=args.sw_batch_size,
            device=args.device,
        )
    except CheckpointError as exc:
        print(f"error: {exc}")
        return 2
    written, problems = infer_files(
        segmenter,
        args.inputs,
        args.output,
        overwrite=args.overwrite,
        overlays=not args.no_overlay,
        report=_to_stderr,
    )
    print(f"infer: wrote {len(written)} mask(s) to {args.output}; {len(problems)} failed")
    return 1 if problems or not written else 0


def _run_eval(args: argparse.Namespace) -> int:
    from attn_medical.evaluate import run_eval

    return run_eval(args)


def _run_make_wounds(args: argparse.Namespace) -> int:
    from attn_medical.synthetic import write_wounds

    size = (args.size[0], args.size[-1])
    try:
        write_wounds(args.out, args.count, size, seed=args.seed, overwrite=args.overwrite)
    except FileExistsError as exc:
        print(f"error: {exc}")
        return 2
    print(f"make-data: {args.count} wound images in {args.out}/images, masks in {args.out}/masks")
    return 0


def _run_make_volumes(args: argparse.Namespace) -> int:
    from attn_medical.synthetic import write_volumes

    try:
        write_volumes(
            args.out,
            args.count,
            test_count=args.test_count,
            shape=tuple(args.shape),
            spacing=tuple(args.spacing),
            seed=args.seed,
            overwrite=args.overwrite,
        )
    except FileExistsError as exc:
        print(f"error: {exc}")
        return 2
    print(f"make-data: {args.count} training + {args.test_count} test volumes in {args.out}")
    return 0


def _add_infer(cli: AppCommandLine) -> None:
    p = cli.add_command("infer", "segment images (PNG/JPG) or NIfTI volumes with a checkpoint")
    p.add_argument("inputs", nargs="+", type=Path, help="image/volume files or folders of them")
    p.add_argument("--model", "-m", type=Path, required=True, help="checkpoint folder")
    p.add_argument("--output", "-o", type=Path, required=True, help="folder for the masks")
    p.add_argument("--tta", action="store_true", help="average over flipped inputs (default: off)")
    p.add_argument(
        "--overlap",
        type=float,
        default=0.5,
        help="sliding-window overlap for inputs larger than the patch (default: 0.5)",
    )
    p.add_argument(
        "--sw-batch-size", type=int, default=4, help="windows per forward pass (default: 4)"
    )
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--no-overlay", action="store_true", help="skip the PNG overlays of 2D inputs")
    p.add_argument("--overwrite", action="store_true", help="replace existing masks")
    p.set_defaults(func=_run_infer)


def _add_eval(cli: AppCommandLine) -> None:
    p = cli.add_command("eval", "Dice, IoU and HD95 of predicted masks against ground truth")
    p.add_argument("pred", type=Path, help="predicted mask file or folder")
    p.add_argument("gt", type=Path, help="ground-truth mask file or folder (same case names)")
    p.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classes including background (default: largest label seen + 1)",
    )
    p.add_argument(
        "--spacing",
        type=float,
        nargs="+",
        default=None,
        help="pixel/voxel size in mm per axis (default: the NIfTI header; 1 pixel for pictures)",
    )
    p.add_argument("--csv", type=Path, default=None, help="write per-case scores here (CSV)")
    p.add_argument("--json", type=Path, default=None, help="write scores and means here (JSON)")
    p.set_defaults(func=_run_eval)


def _add_make_data(cli: AppCommandLine) -> None:
    p = cli.add_command("make-data", "write synthetic datasets (offline)")
    sub = cli.subcommands(p)
    w = sub.add_parser(
        "wounds",
        help="2D wound photographs with exact masks (images/ + masks/)",
        description="2D wound photographs with exact masks (images/ + masks/)",
    )
    w.add_argument("--out", type=Path, required=True, help="output folder")
    w.add_argument("--count", type=int, default=200, help="number of images (default: 200)")
    w.add_argument(
        "--size",
        type=int,
        nargs="+",
        default=[128],
        help="side in pixels, or MIN MAX for random sizes per axis (default: 128)",
    )
    w.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    w.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    w.set_defaults(func=_run_make_wounds)
    v = sub.add_parser(
        "volumes",
        help="3D NIfTI ellipsoids in noise, Decathlon layout",
        description="3D NIfTI ellipsoids in noise, Decathlon layout (imagesTr/, labelsTr/, "
        "imagesTs/, dataset.json)",
    )
    v.add_argument("--out", type=Path, required=True, help="output folder")
    v.add_argument("--count", type=int, default=24, help="training volumes (default: 24)")
    v.add_argument("--test-count", type=int, default=4, help="test volumes (default: 4)")
    v.add_argument(
        "--shape", type=int, nargs=3, default=[48, 48, 48], help="voxels (default: 48 48 48)"
    )
    v.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=[1.0, 1.0, 1.5],
        help="voxel size in mm (default: 1 1 1.5)",
    )
    v.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    v.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    v.set_defaults(func=_run_make_volumes)


_add_train(CLI)
_add_infer(CLI)
_add_eval(CLI)
_add_make_data(CLI)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    logging.getLogger("attn_training").setLevel(logging.INFO)
    return CLI.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
