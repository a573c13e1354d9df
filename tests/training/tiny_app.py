"""A tiny app with a ``train`` command on attn_training, as the apps write theirs.

Used in-process by the tests (model, dataset, validation) and as a script started with
``python`` or ``torchrun`` (kill/resume and distributed tests). Test-only switches:
``--bad`` / ``--nan`` (broken samples), ``--sleep`` (slow steps, so a run can be
killed mid-way) and ``--dump-rank-weights``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset

from attn_training import PretrainedMixin, TrainConfig, Trainer, add_train_arguments
from attn_training.rng import seed_everything


class TinyMLP(PretrainedMixin, nn.Module):
    """Two linear layers."""

    def __init__(
        self, in_features: int = 8, hidden: int = 16, out_features: int = 1, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.head = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Synthetic(Dataset):
    """``y = w·x + noise``, ``w`` fixed, ``x`` drawn from ``seed``; ``augment`` jitters ``x``."""

    def __init__(
        self,
        n: int = 64,
        *,
        seed: int = 123,
        augment: bool = False,
        bad: tuple[int, ...] = (),
        nan: tuple[int, ...] = (),
    ) -> None:
        w = torch.randn(8, 1, generator=torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ w + 0.1 * torch.randn(n, 1, generator=g)
        self.augment, self.bad, self.nan = augment, set(bad), set(nan)

    def __len__(self) -> int:
        return len(self.x)

    def sample_path(self, index: int) -> str:
        return f"/data/sample_{index:04d}.npy"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index in self.bad:
            raise OSError(f"cannot read {self.sample_path(index)}: truncated file")
        x = self.x[index].clone()
        if self.augment:
            x += 0.05 * torch.randn(8)
        if index in self.nan:
            x[0] = float("nan")
        return x, self.y[index]


def mse_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def make_val_fn(n: int = 32):
    val = Synthetic(n, seed=7)

    def val_fn(model: nn.Module) -> dict[str, float]:
        return {"loss": float(nn.functional.mse_loss(model(val.x), val.y))}

    return val_fn


def _indices(text: str) -> tuple[int, ...]:
    return tuple(int(i) for i in text.split(",") if i)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiny-app train")
    add_train_arguments(
        parser, batch_size=4, lr=1e-2, save_every=5, num_workers=0, log_every=1, progress=False
    )
    parser.add_argument("--n-samples", type=int, default=64, help="dataset size")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout probability")
    parser.add_argument("--augment", action="store_true", help="random input noise")
    parser.add_argument("--bad", type=_indices, default=(), help="unreadable sample indices")
    parser.add_argument("--nan", type=_indices, default=(), help="NaN sample indices")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds per step")
    parser.add_argument("--dump-rank-weights", action="store_true", help="rank<i>.safetensors")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    config = TrainConfig.from_args(args)
    seed_everything(config.seed)
    model = TinyMLP(dropout=args.dropout)
    data = Synthetic(args.n_samples, augment=args.augment, bad=args.bad, nan=args.nan)

    def loss_fn(model, batch):
        time.sleep(args.sleep)
        return mse_loss(model, batch)

    trainer = Trainer(model, data, config, loss_fn=loss_fn, val_fn=make_val_fn())
    trainer.fit()
    if args.dump_rank_weights:
        rank = trainer.accelerator.process_index
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, Path(config.output_dir) / f"rank{rank}.safetensors")


if __name__ == "__main__":
    main()
