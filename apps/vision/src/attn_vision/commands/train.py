"""``attn-vision train DATA --model M``: image classification on the attn_training harness.

Data: an ImageFolder (``ROOT/<class>/<image>``) or a CSV (``path,label``), augmented with
timm's training transform (``create_transform``: random-resized crop, flip, RandAugment
``--aa``, random erasing ``--reprob``) and Mixup/CutMix (``timm.data.Mixup``); validation on
``--val-data`` or a held-out ``--val-split`` with timm's evaluation transform. Optimizer and
scheduler come from timm's factories (``--opt``, ``--sched``). ``--init-from`` accepts the
official BiFormer ``.pth`` as well as model folders; ``--num-classes`` (or a dataset with a
different number of classes) puts a new head on it.

The run (checkpoints, resume, DDP under ``torchrun`` / ``accelerate launch``, EMA, early
stop, ``final/`` and ``best/`` exports) is the harness's; the exported folders hold timm's
``config.json`` with the class names, so ``attn-vision infer --model OUT/final`` and
``timm.create_model("local-dir:OUT/final", pretrained=True)`` read them.
"""

from __future__ import annotations

import argparse
import ast
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.data import Mixup, create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from attn_training import TrainConfig, Trainer, add_train_arguments, seed_everything
from attn_vision.checkpoint import create_model, hf_config, load_checkpoint
from attn_vision.commands.common import warn
from attn_vision.data import LabeledImages, labeled_dataset

TIMM_SCHEDULES = ("cosine", "tanh", "step", "multistep", "poly")


class ParseKwargs(argparse.Action):
    """``KEY=VALUE`` pairs into a dict; values are Python literals (else strings)."""

    def __call__(self, parser, namespace, values, option_string=None):
        out = {}
        for item in values:
            key, sep, value = item.partition("=")
            if not sep or not key:
                parser.error(f"{option_string}: expected KEY=VALUE, got {item!r}")
            try:
                out[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                out[key] = value
        setattr(namespace, self.dest, out)


def split_holdout(
    dataset: LabeledImages, fraction: float, seed: int
) -> tuple[LabeledImages, LabeledImages]:
    """A stratified random split: ``fraction`` of every class goes to the second part."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(dataset.samples):
        by_class.setdefault(label, []).append(i)
    held: set[int] = set()
    for items in by_class.values():
        rng.shuffle(items)
        held.update(items[: round(len(items) * fraction)])
    train = [s for i, s in enumerate(dataset.samples) if i not in held]
    val = [s for i, s in enumerate(dataset.samples) if i in held]
    return (
        LabeledImages(train, dataset.classes, dataset.transform),
        LabeledImages(val, dataset.classes, dataset.transform),
    )


def make_transforms(model: torch.nn.Module, args: argparse.Namespace):
    """Training and evaluation transforms, and the data config they share."""
    overrides = {} if args.img_size is None else {"input_size": (3, args.img_size, args.img_size)}
    data = resolve_data_config(overrides, model=model)
    train_tf = create_transform(
        **data,
        is_training=True,
        auto_augment=args.aa or None,
        re_prob=args.reprob,
        scale=tuple(args.scale),
        hflip=args.hflip,
        color_jitter=args.color_jitter,
    )
    eval_tf = create_transform(**data, is_training=False)
    return train_tf, eval_tf, data


def make_loss(args: argparse.Namespace, num_classes: int):
    """``(mixup_fn or None, criterion)``; soft targets when Mixup/CutMix is on."""
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=args.mixup,
            cutmix_alpha=args.cutmix,
            prob=args.mixup_prob,
            label_smoothing=args.smoothing,
            num_classes=num_classes,
        )
        return mixup, SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(args.smoothing)
    return None, torch.nn.CrossEntropyLoss()


@torch.no_grad()
def validation_metrics(
    model: torch.nn.Module, dataset: LabeledImages, batch_size: int
) -> dict[str, float]:
    """Loss, top-1 and top-5 on this process's shard of ``dataset``."""
    from accelerate import PartialState

    state = PartialState()
    indices = list(range(state.process_index, len(dataset), state.num_processes))
    device = next(model.parameters()).device
    loss = top1 = top5 = 0.0
    for start in range(0, len(indices), batch_size):
        items = [dataset[i] for i in indices[start : start + batch_size]]
        x = torch.stack([im for im, _ in items]).to(device)
        y = torch.tensor([label for _, label in items], device=device)
        logits = model(x).float()
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        top1 += float((top[:, 0] == y).sum())
        top5 += float((top == y[:, None]).any(1).sum())
    n = max(len(indices), 1)
    return {"loss": loss / n, "top1": top1 / n, "top5": top5 / n}


def run(args: argparse.Namespace) -> int:
    config = TrainConfig.from_args(
        args, data=str(args.data), model=args.model, val_data=str(args.val_data or "")
    )
    # --init-from is loaded here (official BiFormer names, new heads), not by the harness
    init_from, config.init_from = config.init_from, None
    config.extra["init_from"] = None if init_from is None else str(init_from)
    seed_everything(config.seed)

    probe = labeled_dataset(args.data)
    classes = probe.classes
    num_classes = args.num_classes or len(classes)
    if num_classes != len(classes):
        raise ValueError(f"{args.data} has {len(classes)} classes, --num-classes {num_classes}")
    model = create_model(
        args.model, num_classes=num_classes, drop_path_rate=args.drop_path, **args.model_kwargs
    )
    if init_from is not None:
        report = load_checkpoint(
            model, init_from, new_head=True, skip_mismatched=config.init_skip_mismatched
        )
        warn(f"initialised from {init_from}: {report.describe()}")

    train_tf, eval_tf, data_config = make_transforms(model, args)
    train_set = labeled_dataset(args.data, train_tf, classes)
    if args.val_data is not None:
        val_set = labeled_dataset(args.val_data, eval_tf, classes)
    elif args.val_split > 0:
        train_set, val_set = split_holdout(train_set, args.val_split, config.seed)
        val_set.transform = eval_tf
    else:
        val_set = None

    mixup, criterion = make_loss(args, num_classes)
    if mixup is not None and config.batch_size % 2:
        raise ValueError("Mixup/CutMix pair the samples of a batch: use an even --batch-size")

    def loss_fn(model, batch):
        images, labels = batch
        if mixup is not None and len(images) % 2:
            # a sample that failed to load left the batch odd; Mixup needs pairs
            images, labels = images[:-1], labels[:-1]
        hard = labels
        if mixup is not None:
            images, labels = mixup(images, labels)
        logits = model(images)
        accuracy = (logits.argmax(1) == hard).float().mean()
        return criterion(logits, labels), {"accuracy": accuracy}

    def optimizer_fn(model):
        return create_optimizer_v2(
            model,
            opt=args.opt,
            lr=config.lr,
            weight_decay=config.weight_decay,
            momentum=args.momentum,
        )

    def scheduler_fn(optimizer, total_steps):
        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched=args.sched,
            num_epochs=total_steps,
            warmup_epochs=config.warmup_steps,
            warmup_lr=config.lr * 1e-3,
            min_lr=config.min_lr,
            decay_epochs=max(total_steps // 3, 1),
            step_on_epochs=False,
            updates_per_epoch=1,
        )
        return scheduler

    trainer = Trainer(
        model,
        train_set,
        config,
        loss_fn=loss_fn,
        val_fn=(lambda m: validation_metrics(m, val_set, config.batch_size)) if val_set else None,
        optimizer_fn=optimizer_fn,
        scheduler_fn=scheduler_fn if args.sched else None,
        model_config=hf_config(model, classes, data_config),
    )
    result = trainer.fit()
    if trainer.accelerator.is_main_process:
        print(
            f"model in {result.final_dir}"
            + (f", best in {result.best_dir}" if result.best_dir else "")
        )
    return 0


def register(cli) -> None:
    p = cli.add_command("train", "train or fine-tune a classifier on an ImageFolder or CSV")
    p.add_argument("data", type=Path, help="ImageFolder (ROOT/<class>/<image>) or CSV (path,label)")
    p.add_argument(
        "--model",
        default="biformer_tiny",
        metavar="NAME|DIR",
        help="timm model name or model folder (default: %(default)s)",
    )
    p.add_argument(
        "--model-kwargs",
        nargs="*",
        default={},
        action=ParseKwargs,
        metavar="KEY=VALUE",
        help="extra model arguments, values as Python literals, e.g. depths='(1,1,2,1)' n_win=4",
    )
    p.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classes of the new head (default: the dataset's)",
    )
    p.add_argument(
        "--val-data",
        type=Path,
        default=None,
        help="validation ImageFolder or CSV (default: --val-split of the training data)",
    )
    p.add_argument(
        "--val-split",
        type=float,
        default=0.1,
        help="fraction held out per class for validation when --val-data is absent; "
        "0: none (default: %(default)s)",
    )
    p.add_argument(
        "--img-size",
        type=int,
        default=None,
        help="training/validation input side (default: the model's)",
    )
    aug = p.add_argument_group("augmentation (timm)")
    aug.add_argument(
        "--aa",
        default="rand-m9-mstd0.5-inc1",
        help="timm auto-augment policy, '' for none (default: %(default)s)",
    )
    aug.add_argument(
        "--reprob",
        type=float,
        default=0.25,
        help="random-erasing probability (default: %(default)s)",
    )
    aug.add_argument(
        "--scale",
        type=float,
        nargs=2,
        default=(0.08, 1.0),
        help="random-resized-crop area range (default: %(default)s)",
    )
    aug.add_argument(
        "--hflip",
        type=float,
        default=0.5,
        help="horizontal flip probability (default: %(default)s)",
    )
    aug.add_argument(
        "--color-jitter",
        type=float,
        default=0.4,
        help="colour jitter strength (default: %(default)s)",
    )
    aug.add_argument(
        "--mixup", type=float, default=0.8, help="Mixup alpha; 0: off (default: %(default)s)"
    )
    aug.add_argument(
        "--cutmix", type=float, default=1.0, help="CutMix alpha; 0: off (default: %(default)s)"
    )
    aug.add_argument(
        "--mixup-prob",
        type=float,
        default=1.0,
        help="probability of Mixup/CutMix per batch (default: %(default)s)",
    )
    aug.add_argument(
        "--smoothing", type=float, default=0.1, help="label smoothing (default: %(default)s)"
    )
    opt = p.add_argument_group("optimizer and schedule (timm factories)")
    opt.add_argument("--opt", default="adamw", help="timm optimizer name (default: %(default)s)")
    opt.add_argument(
        "--momentum",
        type=float,
        default=0.9,
        help="momentum of SGD-like optimizers (default: %(default)s)",
    )
    opt.add_argument(
        "--sched",
        default="cosine",
        choices=(*TIMM_SCHEDULES, ""),
        help="timm scheduler, in optimizer steps with --warmup-steps and --min-lr; '' "
        "uses the harness's --lr-schedule (default: %(default)s)",
    )
    opt.add_argument(
        "--drop-path", type=float, default=0.1, help="stochastic depth rate (default: %(default)s)"
    )
    add_train_arguments(
        p,
        output_dir=Path("runs/vision"),
        batch_size=64,
        lr=5e-4,
        weight_decay=0.05,
        warmup_steps=500,
        min_lr=1e-5,
        best_metric="top1",
        best_mode="max",
    )
    p.set_defaults(func=run)
