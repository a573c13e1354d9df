"""The training options every app's ``train`` subcommand shares.

:class:`TrainConfig` holds them; :func:`add_train_arguments` adds them to an ``argparse``
parser (an app may change any default); :meth:`TrainConfig.from_args` reads them back.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attn_training.schedule import SCHEDULES

PRECISIONS = ("no", "fp16", "bf16")
STRATEGIES = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    """Options of a training run (see ``add_train_arguments`` for their meaning)."""

    output_dir: Path = Path("runs/train")
    max_steps: int = 0
    epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr: float = 0.0
    grad_accum: int = 1
    clip_grad: float = 0.0
    precision: str = "no"
    ema: float = 0.0
    save_every: int = 500
    keep_last: int = 3
    resume: str = "auto"
    overwrite: bool = False
    init_from: Path | None = None
    init_skip_mismatched: bool = False
    seed: int = 0
    deterministic: bool = False
    num_workers: int = 2
    val_every: int = 0
    best_metric: str = "loss"
    best_mode: str = "min"
    early_stop: int = 0
    log_every: int = 10
    max_bad_fraction: float = 0.05
    max_nonfinite: int = 5
    strategy: str = "ddp"
    cpu: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    """App-specific values stored with the run (``train_config.json``); not used here."""

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        if self.init_from is not None:
            self.init_from = Path(self.init_from)
        problems = []
        for name in ("epochs", "batch_size", "grad_accum", "save_every", "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"--{_flag(name)} must be at least 1")
        for name in ("max_steps", "warmup_steps", "keep_last", "val_every", "early_stop"):
            if getattr(self, name) < 0:
                problems.append(f"--{_flag(name)} must not be negative")
        if self.seed < 0:
            problems.append("--seed must not be negative")
        if self.num_workers < 0:
            problems.append("--num-workers must not be negative")
        if self.lr <= 0:
            problems.append("--lr must be positive")
        if self.clip_grad < 0 or self.min_lr < 0 or self.weight_decay < 0:
            problems.append("--clip-grad, --min-lr and --weight-decay must not be negative")
        if not 0.0 <= self.ema < 1.0:
            problems.append("--ema must be in [0, 1)")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            problems.append("--max-bad-fraction must be in [0, 1]")
        if self.max_nonfinite < 1:
            problems.append("--max-nonfinite must be at least 1")
        choices = {
            "precision": PRECISIONS,
            "lr_schedule": SCHEDULES,
            "best_mode": ("min", "max"),
            "strategy": STRATEGIES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                problems.append(f"--{_flag(name)} must be one of {', '.join(allowed)}")
        if problems:
            raise ValueError("invalid training options: " + "; ".join(problems))

    @classmethod
    def from_args(cls, args: argparse.Namespace, **extra: Any) -> TrainConfig:
        """Build from parsed arguments; ``extra`` values go to :attr:`extra`."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in vars(args).items() if k in names}
        return cls(**values, extra=dict(extra))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every option."""
        out = dataclasses.asdict(self)
        out["output_dir"] = str(self.output_dir)
        out["init_from"] = None if self.init_from is None else str(self.init_from)
        return out

    @property
    def val_interval(self) -> int:
        """Steps between validations (``--val-every``, or ``--save-every`` when 0)."""
        return self.val_every or self.save_every


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _check_resume(value: str) -> str:
    if not value:
        raise argparse.ArgumentTypeError("give auto, none or a checkpoint folder")
    return value


# (field, type or action, metavar, help). Defaults come from TrainConfig or the app.
_OPTIONS: list[tuple[str, Any, str | None, str]] = [
    ("output_dir", Path, "DIR", "folder for checkpoints, metrics, plots and the final model"),
    ("max_steps", int, "N", "optimizer steps to train; 0: as many as --epochs take"),
    ("epochs", int, "N", "passes over the data (used when --max-steps is 0)"),
    ("batch_size", int, "N", "samples per process per micro-batch"),
    ("lr", float, "LR", "peak learning rate"),
    ("weight_decay", float, "WD", "weight decay of the default AdamW optimizer"),
    ("lr_schedule", str, None, "decay after warm-up: " + ", ".join(SCHEDULES)),
    ("warmup_steps", int, "N", "steps of linear learning-rate warm-up"),
    ("min_lr", float, "LR", "learning rate at the end of the cosine/linear decay"),
    ("grad_accum", int, "N", "micro-batches accumulated per optimizer step"),
    ("clip_grad", float, "NORM", "clip the gradient norm to NORM; 0: no clipping"),
    ("precision", str, None, "mixed precision: no, fp16 or bf16"),
    ("ema", float, "DECAY", "keep an EMA of the weights with this decay (e.g. 0.999); 0: off"),
    ("save_every", int, "N", "write a checkpoint every N steps (and at the end)"),
    ("keep_last", int, "K", "keep the K newest checkpoints; 0: keep all"),
    (
        "resume",
        _check_resume,
        "auto|none|DIR",
        "auto: continue from the newest valid "
        "checkpoint in --output-dir if any; none: start fresh; DIR: that checkpoint",
    ),
    (
        "overwrite",
        "store_true",
        None,
        "allow starting fresh in an --output-dir that "
        "holds a previous run (its checkpoints, metrics and exports are deleted)",
    ),
    (
        "init_from",
        Path,
        "PATH",
        "initial weights for fine-tuning: a checkpoint or "
        "pretrained folder, or a .safetensors/.pt file (ignored when resuming)",
    ),
    (
        "init_skip_mismatched",
        "store_true",
        None,
        "with --init-from, keep the model's own "
        "values for keys whose shape differs or that are missing (e.g. a new head)",
    ),
    ("seed", int, "N", "random seed (data order, augmentation, initialisation)"),
    ("deterministic", "store_true", None, "use deterministic algorithms only (slower)"),
    ("num_workers", int, "N", "data-loading worker processes per training process"),
    ("val_every", int, "N", "validate every N steps; 0: at every checkpoint"),
    ("best_metric", str, "NAME", "validation metric that selects the best model"),
    ("best_mode", str, None, "whether a smaller (min) or larger (max) metric is better"),
    ("early_stop", int, "N", "stop after N validations without improvement; 0: never"),
    ("log_every", int, "N", "log metrics every N steps"),
    (
        "max_bad_fraction",
        float,
        "F",
        "abort when more than this fraction of the samples "
        "fail to load (counted from the data drawn, at least the dataset size)",
    ),
    ("max_nonfinite", int, "K", "abort after K consecutive steps with a NaN/inf loss"),
    ("strategy", str, None, "distributed strategy: ddp, or fsdp (shard the model)"),
    ("cpu", "store_true", None, "train on the CPU even if a GPU is present"),
    ("progress", argparse.BooleanOptionalAction, None, "show a progress bar"),
]
_CHOICES = {
    "lr_schedule": SCHEDULES,
    "precision": PRECISIONS,
    "best_mode": ("min", "max"),
    "strategy": STRATEGIES,
}


def add_train_arguments(
    parser: argparse.ArgumentParser, *, group_title: str = "training", **defaults: Any
) -> argparse._ArgumentGroup:
    """Add the common training options to ``parser``; ``defaults`` override the defaults.

    Example: ``add_train_arguments(parser, batch_size=64, lr=3e-4, max_steps=20000)``.
    """
    known = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = set(defaults) - set(known)
    if unknown:
        raise TypeError(f"no training option named {', '.join(sorted(unknown))}")
    base = TrainConfig()
    group = parser.add_argument_group(group_title)
    for name, kind, metavar, help_text in _OPTIONS:
        default = defaults.get(name, getattr(base, name))
        kwargs: dict[str, Any] = {"dest": name, "default": default}
        if kind == "store_true":
            kwargs.update(action="store_true", help=help_text)
        elif kind is argparse.BooleanOptionalAction:
            kwargs.update(action=kind, help=help_text + " (default: %(default)s)")
        else:
            kwargs.update(type=kind, help=help_text + " (default: %(default)s)")
            if metavar:
                kwargs["metavar"] = metavar
            if name in _CHOICES:
                kwargs["choices"] = _CHOICES[name]
        group.add_argument(f"--{_flag(name)}", **kwargs)
    return group
