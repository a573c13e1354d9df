"""``attn-medical train DATA``: the attention residual U-Net on the shared training harness.

Loss: Dice + cross-entropy with deep supervision (:mod:`attn_medical.losses`). Validation:
Dice per foreground class on the held-out fold, whole images segmented as ``infer`` does.
The harness (``attn_training``) brings checkpoints, resume, DDP (``torchrun`` /
``accelerate launch``), mixed precision, EMA and the ``final/`` and ``best/`` exports,
which ``attn-medical infer --model`` reads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _stride(text: str) -> int | tuple[int, ...]:
    parts = [int(p) for p in text.split(",")]
    return parts[0] if len(parts) == 1 else tuple(parts)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from attn_training import add_train_arguments

    p.add_argument(
        "data",
        type=Path,
        help="dataset folder: images/ + masks/ (2D) or a Decathlon/nnU-Net folder (3D)",
    )
    d = p.add_argument_group("data")
    d.add_argument("--folds", type=int, default=5, help="folds of the k-fold split (default: 5)")
    d.add_argument(
        "--fold",
        type=int,
        default=0,
        help="validation fold; -1 trains on every case without validation (default: 0)",
    )
    d.add_argument("--split-seed", type=int, default=0, help="seed of the split (default: 0)")
    d.add_argument(
        "--patch-size",
        type=int,
        nargs="+",
        default=None,
        help="training patch (and sliding window) per axis (default: median case size, "
        "at most 256 in 2D / 96 in 3D, rounded to the network's stride multiple)",
    )
    d.add_argument(
        "--fg-fraction",
        type=float,
        default=0.33,
        help="share of patches centred on foreground (default: 0.33)",
    )
    d.add_argument("--no-augment", action="store_true", help="no spatial/intensity augmentation")
    d.add_argument(
        "--samples-per-epoch",
        type=int,
        default=0,
        help="patches per epoch; 0: the number of cases, at least 50 batches (default: 0)",
    )
    m = p.add_argument_group("model")
    m.add_argument(
        "--channels",
        type=int,
        nargs="+",
        default=[16, 32, 64, 128],
        help="feature channels per level, finest first (default: 16 32 64 128)",
    )
    m.add_argument(
        "--strides",
        type=_stride,
        nargs="+",
        default=None,
        help="down-sampling per level below the first, e.g. 2 2 2 or 1,2,2 2 2 (default: 2s)",
    )
    m.add_argument(
        "--blocks-per-level", type=int, default=1, help="residual units per level (default: 1)"
    )
    m.add_argument(
        "--norm",
        default="instance",
        choices=("batch", "instance", "group", "none"),
        help="normalisation (default: instance)",
    )
    m.add_argument(
        "--act", default="leakyrelu", choices=("leakyrelu", "relu"), help="(default: leakyrelu)"
    )
    m.add_argument("--dropout", type=float, default=0.0, help="dropout (default: 0)")
    m.add_argument(
        "--deep-supervision",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="auxiliary losses on the decoder levels (default: on)",
    )
    add_train_arguments(
        p,
        output_dir=Path("runs/medical"),
        max_steps=1000,
        batch_size=8,
        lr=2e-3,
        weight_decay=1e-5,
        warmup_steps=20,
        save_every=250,
        best_metric="dice",
        best_mode="max",
        num_workers=0,
    )


def _write_splits(out: Path, splits: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "splits.json").write_text(json.dumps(splits, indent=2) + "\n", encoding="utf-8")


def run_train(args: argparse.Namespace) -> int:
    from attn_medical.datasets import discover, kfold_splits, load_cases
    from attn_medical.io import InputError
    from attn_medical.losses import SegmentationLoss
    from attn_medical.models import AttentionResUNet, AttentionResUNetConfig
    from attn_medical.training import (
        PatchDataset,
        auto_patch_size,
        build_preprocessing,
        prepare_cases,
        validate,
    )
    from attn_medical.transforms import train_transform
    from attn_training import TrainConfig, Trainer, seed_everything

    # The harness builds the accelerator (and the process group) later; until then the
    # launcher's RANK tells which process prints and writes the split.
    main_process = int(os.environ.get("RANK", "0")) == 0
    try:
        spec = discover(args.data)
    except InputError as exc:
        print(f"error: {exc}")
        return 2
    cases, problems = load_cases(spec, spec.cases)
    if main_process:
        for problem in [*spec.problems, *problems]:
            print(f"error: skipping {problem}", file=sys.stderr)
    if not cases:
        print(f"error: {args.data}: no usable case ({len(problems) + len(spec.problems)} failed)")
        return 2

    if args.fold >= args.folds:
        print(f"error: --fold {args.fold} does not exist with --folds {args.folds}")
        return 2
    val_names: set[str] = set()
    if args.fold >= 0:
        try:
            splits = kfold_splits([c.name for c in cases], args.folds, args.split_seed)
        except ValueError as exc:
            print(f"error: {args.data}: {exc}")
            return 2
        val_names = set(splits[args.fold]["val"])
        if main_process:
            _write_splits(args.output_dir, splits)
    train_cases = [c for c in cases if c.name not in val_names]
    val_cases = [c for c in cases if c.name in val_names]

    try:
        config = AttentionResUNetConfig(
            spatial_dims=spec.spatial_dims,
            in_channels=len(spec.modalities),
            out_channels=spec.num_classes,
            channels=tuple(args.channels),
            strides=tuple(args.strides) if args.strides else None,
            blocks_per_level=args.blocks_per_level,
            norm=args.norm,
            act=args.act,
            dropout=args.dropout,
            deep_supervision=args.deep_supervision,
            labels=dict(spec.labels),
        )
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    if args.patch_size:
        patch = list(args.patch_size) * (spec.spatial_dims if len(args.patch_size) == 1 else 1)
        if len(patch) != spec.spatial_dims:
            print(f"error: --patch-size needs {spec.spatial_dims} values")
            return 2
    else:
        cap = 256 if spec.spatial_dims == 2 else 96
        patch = auto_patch_size(train_cases, config.size_divisor, cap)
    prep = build_preprocessing(spec, train_cases, patch)
    config.preprocessing = prep.to_dict()
    train_config = TrainConfig.from_args(
        args,
        data=str(args.data),
        fold=args.fold,
        folds=args.folds,
        patch_size=patch,
        train_cases=len(train_cases),
        val_cases=len(val_cases),
        skipped_files=[str(p) for p in list(spec.problems) + problems],
    )
    if not val_cases and train_config.best_metric != "loss":
        train_config.best_metric, train_config.best_mode = "loss", "min"

    seed_everything(train_config.seed)
    model = AttentionResUNet(config)
    train_prepared = prepare_cases(train_cases, prep)
    val_prepared = prepare_cases(val_cases, prep)
    length = args.samples_per_epoch or max(len(train_prepared), 50 * train_config.batch_size)
    dataset = PatchDataset(
        train_prepared,
        train_transform(patch, spec.spatial_dims, not args.no_augment, args.fg_fraction),
        length=length,
    )
    loss = SegmentationLoss()

    def loss_fn(model, batch):
        return loss(model(batch["image"]), batch["label"])

    def val_fn(model):
        device = next(model.parameters()).device
        return validate(model, val_prepared, patch, config.out_channels, device=device)

    if main_process:
        print(
            f"train: {len(train_cases)} training and {len(val_cases)} validation case(s), "
            f"patch {patch}, classes {spec.labels}"
        )
    trainer = Trainer(
        model,
        dataset,
        train_config,
        loss_fn=loss_fn,
        val_fn=val_fn if val_cases else None,
        model_config=config.to_dict(),
    )
    result = trainer.fit()
    if trainer.accelerator.is_main_process:
        print(f"train: final model in {result.final_dir}")
        if result.best_dir is not None:
            metric = f"{train_config.best_metric} {result.best_value:.4f}"
            print(f"train: best model ({metric}) in {result.best_dir}")
    return 0
