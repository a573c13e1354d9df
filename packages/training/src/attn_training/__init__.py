"""attn-training: the shared training harness of attention-apps.

An app's ``train`` subcommand adds the common options with :func:`add_train_arguments`,
builds a :class:`TrainConfig` from them, and runs a :class:`Trainer`. Pretrained folders
(``model.safetensors`` + ``config.json``) are written and read with
:class:`PretrainedMixin`; ``attn_training.pretrained`` is light enough for inference code.

Names are imported on first use, so ``import attn_training.pretrained`` does not load
``accelerate`` or the training loop.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "AuxModel": "attn_training.trainer",
    "TrainConfig": "attn_training.options",
    "add_train_arguments": "attn_training.options",
    "Trainer": "attn_training.trainer",
    "TrainResult": "attn_training.trainer",
    "TrainState": "attn_training.trainer",
    "NonFiniteLossError": "attn_training.trainer",
    "BadDataError": "attn_training.data",
    "CheckpointError": "attn_training.checkpoint",
    "ModelEMA": "attn_training.ema",
    "PretrainedMixin": "attn_training.pretrained",
    "StateDictMismatchError": "attn_training.pretrained",
    "load_state_dict_checked": "attn_training.pretrained",
    "load_weights": "attn_training.pretrained",
    "save_pretrained_state": "attn_training.pretrained",
    "seed_everything": "attn_training.rng",
}

__all__ = [
    "AuxModel",
    "BadDataError",
    "CheckpointError",
    "ModelEMA",
    "NonFiniteLossError",
    "PretrainedMixin",
    "StateDictMismatchError",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "Trainer",
    "__version__",
    "add_train_arguments",
    "load_state_dict_checked",
    "load_weights",
    "save_pretrained_state",
    "seed_everything",
]

if TYPE_CHECKING:
    from attn_training.checkpoint import CheckpointError
    from attn_training.data import BadDataError
    from attn_training.ema import ModelEMA
    from attn_training.options import TrainConfig, add_train_arguments
    from attn_training.pretrained import (
        PretrainedMixin,
        StateDictMismatchError,
        load_state_dict_checked,
        load_weights,
        save_pretrained_state,
    )
    from attn_training.rng import seed_everything
    from attn_training.trainer import (
        AuxModel,
        NonFiniteLossError,
        Trainer,
        TrainResult,
        TrainState,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'attn_training' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
