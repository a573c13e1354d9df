"""Exponential moving average of model weights."""

from __future__ import annotations

import copy

import torch


class ModelEMA:
    """A copy of a model whose weights follow ``ema = decay * ema + (1 - decay) * w``.

    Floating-point parameters and buffers are averaged after every optimizer step;
    integer buffers (e.g. BatchNorm's ``num_batches_tracked``) are copied. The copy is
    kept in evaluation mode without gradients, on the model's device.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Move the average one step towards ``model``'s current weights."""
        current = model.state_dict()
        for name, ema_value in self.module.state_dict().items():
            value = current[name].detach()
            if ema_value.is_floating_point():
                ema_value.mul_(self.decay).add_(value.to(ema_value.dtype), alpha=1.0 - self.decay)
            else:
                ema_value.copy_(value)

    def to(self, device: torch.device | str) -> ModelEMA:
        """Move the averaged copy to ``device``."""
        self.module.to(device)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights."""
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Restore averaged weights saved by :meth:`state_dict`."""
        self.module.load_state_dict(state_dict, strict=True)
