"""Learning-rate warm-up and decay, and the EMA of the weights, against hand values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from attn_training.ema import ModelEMA
from attn_training.schedule import advance_scheduler, build_scheduler


def _lrs(kind, steps, **kw):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = build_scheduler(opt, kind=kind, lr=0.5, **kw)
    out = []
    for step in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        advance_scheduler(sched, step + 1)
    return out


def test_warmup_then_cosine():
    lrs = _lrs("cosine", 10, warmup_steps=4, total_steps=8, min_lr=0.1)
    expected = [0.5 * 1 / 4, 0.5 * 2 / 4, 0.5 * 3 / 4, 0.5]
    expected += [0.1 + 0.4 * 0.5 * (1 + math.cos(math.pi * p / 4)) for p in (0, 1, 2, 3)]
    expected += [0.1, 0.1]  # from total_steps on the schedule stays at its end
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_warmup_then_linear_and_constant():
    assert _lrs("linear", 5, warmup_steps=1, total_steps=5) == pytest.approx(
        [0.5, 0.5, 0.375, 0.25, 0.125], rel=1e-12
    )
    assert _lrs("constant", 4, warmup_steps=2, total_steps=4) == pytest.approx(
        [0.25, 0.5, 0.5, 0.5], rel=1e-12
    )


def test_unknown_schedule():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    with pytest.raises(ValueError, match="unknown schedule 'poly'"):
        build_scheduler(opt, kind="poly", lr=0.5, warmup_steps=0, total_steps=3)


def test_timm_scheduler_is_driven_per_step():
    timm_scheduler = pytest.importorskip("timm.scheduler")
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = timm_scheduler.CosineLRScheduler(
        opt, t_initial=6, warmup_t=2, warmup_lr_init=0.05, t_in_epochs=False
    )
    seen = []
    for step in range(6):
        seen.append(opt.param_groups[0]["lr"])
        advance_scheduler(sched, step + 1)
    assert seen == pytest.approx([sched._get_lr(t)[0] for t in range(6)])


def test_ema_matches_a_hand_computation():
    model = nn.BatchNorm1d(3)
    ema = ModelEMA(model, decay=0.75)
    hand = {
        k: v.double() if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()
    }
    for i in range(3):
        with torch.no_grad():
            model.weight.add_(torch.randn(3))
            model.running_mean.add_(torch.randn(3))
        model.num_batches_tracked += 1
        ema.update(model)
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                hand[k] = 0.75 * hand[k] + 0.25 * v.double()
            else:
                hand[k] = v.clone()
        for k, v in ema.state_dict().items():
            torch.testing.assert_close(v.to(hand[k].dtype), hand[k], rtol=1e-6, atol=1e-7)
        assert ema.module.num_batches_tracked.item() == i + 1
    assert not ema.module.training
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_decay_range():
    with pytest.raises(ValueError, match="EMA decay"):
        ModelEMA(nn.Linear(1, 1), decay=1.0)


def test_rng_state_round_trip_from_a_stacked_row():
    """Checkpoints stack the ranks' states; restoring row 1 must restore rank 1's stream."""
    import random

    import numpy as np

    from attn_training.rng import capture_rng_state, restore_rng_state, seed_everything

    seed_everything(1)
    first = capture_rng_state()
    seed_everything(2)
    second = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(2))  # noqa: NPY002
    stacked = {k: torch.stack([first[k], second[k]]) for k in first}
    seed_everything(3)
    restore_rng_state({k: v[1] for k, v in stacked.items()})
    again = (random.random(), np.random.rand(), torch.rand(2))  # noqa: NPY002
    assert again[:2] == expected[:2] and torch.equal(again[2], expected[2])
