"""Fixtures of the attn_training tests: the tiny app and a one-call training run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
TINY_APP = HERE / "tiny_app.py"


def _load_tiny_app():
    name = "attn_training_tests_tiny_app"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TINY_APP)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def tiny():
    """The tiny app module (model, dataset, losses, parser)."""
    return _load_tiny_app()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each test builds its Accelerator from scratch (precision is process-global state)."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def train(tiny, tmp_path):
    """``train(name, *cli_args, dataset=..., **trainer_kwargs)`` runs the tiny app in-process.

    Returns ``(result, trainer)``; the run's folder is ``tmp_path / name``.
    """
    from attn_training import TrainConfig, Trainer
    from attn_training.rng import seed_everything

    def run(name, *args, dataset=None, model=None, val_fn="default", **kwargs):
        parsed = tiny.build_parser().parse_args(["--output-dir", str(tmp_path / name), *args])
        config = TrainConfig.from_args(parsed)
        seed_everything(config.seed)
        model = model if model is not None else tiny.TinyMLP(dropout=parsed.dropout)
        dataset = (
            dataset
            if dataset is not None
            else tiny.Synthetic(
                parsed.n_samples, augment=parsed.augment, bad=parsed.bad, nan=parsed.nan
            )
        )
        kwargs.setdefault("loss_fn", tiny.mse_loss)
        trainer = Trainer(
            model,
            dataset,
            config,
            val_fn=tiny.make_val_fn() if val_fn == "default" else val_fn,
            **kwargs,
        )
        return trainer.fit(), trainer

    return run
