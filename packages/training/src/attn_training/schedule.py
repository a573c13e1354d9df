"""Learning-rate schedules: linear warm-up, then constant, cosine or linear decay.

``lr(step) = lr * factor(step)``, where ``step`` counts optimizer steps from 0 and the
value of ``factor(step)`` is the one used by step ``step``:

- warm-up, ``step < warmup_steps``: ``(step + 1) / warmup_steps``;
- afterwards, with ``p = (step - warmup_steps) / max(1, total_steps - warmup_steps)``
  clamped to ``[0, 1]`` and ``r = min_lr / lr``:
  constant ``1``; cosine ``r + (1 - r) * (1 + cos(pi * p)) / 2``; linear ``1 - (1 - r) * p``.

Apps can pass their own scheduler instead: any ``torch.optim.lr_scheduler.LRScheduler``
(stepped once per optimizer step) or a timm scheduler (``timm.scheduler``, built with
``t_in_epochs=False``; driven through ``step_update(num_updates)``).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

SCHEDULES = ("constant", "cosine", "linear")


def lr_factor(
    step: int, *, warmup_steps: int, total_steps: int, kind: str, min_ratio: float
) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (see module doc)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    if kind == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    raise ValueError(f"unknown schedule {kind!r}; choose from {', '.join(SCHEDULES)}")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    kind: str,
    warmup_steps: int,
    total_steps: int,
    lr: float,
    min_lr: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`lr_factor` (its state holds only the step count)."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; choose from {', '.join(SCHEDULES)}")
    factor = functools.partial(
        lr_factor,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        kind=kind,
        min_ratio=min_lr / lr if lr > 0 else 0.0,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def advance_scheduler(scheduler: Any, steps_done: int) -> None:
    """Tell ``scheduler`` that ``steps_done`` optimizer steps are complete."""
    if hasattr(scheduler, "step_update"):  # timm
        scheduler.step_update(num_updates=steps_done)
    else:
        scheduler.step()
