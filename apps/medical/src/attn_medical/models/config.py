"""The configuration of an attention residual U-Net, as stored in ``config.json``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from attn_medical.models.blocks import ACTIVATIONS, NORMS

MODEL_TYPE = "attention_res_unet"


@dataclass
class AttentionResUNetConfig:
    """Architecture, plus what inference needs to use the network on new files.

    Architecture:
        spatial_dims: 2 (images ``[B, C, H, W]``) or 3 (volumes ``[B, C, D, H, W]``).
        in_channels / out_channels: input channels; classes including background.
        channels: feature channels per level, finest first (one level per entry).
        strides: down-sampling between consecutive levels (``len(channels) - 1`` entries),
            each an int or one int per spatial axis (anisotropic volumes); default 2s.
        blocks_per_level: residual units per encoder level.
        norm: ``batch``, ``instance``, ``group`` or ``none``.
        act: ``leakyrelu`` or ``relu``.
        dropout: dropout inside the residual units.
        deep_supervision: extra 1x1 heads on the decoder levels below the finest
            (``deep_supervision_levels`` of them); used by the training loss only.

    Metadata (not architecture):
        labels: class index (as a string) -> name.
        preprocessing: see :class:`attn_medical.transforms.Preprocessing`.
    """

    spatial_dims: int = 2
    in_channels: int = 3
    out_channels: int = 2
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int | tuple[int, ...], ...] | None = None
    blocks_per_level: int = 1
    norm: str = "instance"
    act: str = "leakyrelu"
    dropout: float = 0.0
    deep_supervision: bool = False
    deep_supervision_levels: int = 2
    labels: dict[str, str] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if self.strides is None:
            self.strides = (2,) * (len(self.channels) - 1)
        self.strides = tuple(
            tuple(int(v) for v in s) if isinstance(s, Sequence) else int(s) for s in self.strides
        )
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if len(self.channels) < 2:
            raise ValueError(f"channels needs at least 2 levels, got {self.channels}")
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError(
                f"strides needs {len(self.channels) - 1} entries (one per level below the "
                f"first), got {len(self.strides)}"
            )
        for s in self.strides:
            if isinstance(s, tuple) and len(s) != self.spatial_dims:
                raise ValueError(f"stride {s} needs {self.spatial_dims} entries")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {ACTIVATIONS}, got {self.act!r}")
        if self.out_channels < 2:
            raise ValueError("out_channels counts the background too: at least 2")
        if self.blocks_per_level < 1:
            raise ValueError("blocks_per_level must be at least 1")
        self.deep_supervision_levels = max(
            0, min(self.deep_supervision_levels, len(self.channels) - 2)
        )

    def stride_per_axis(self, level: int) -> tuple[int, ...]:
        """The stride between level ``level`` and ``level + 1``, one entry per axis."""
        s = self.strides[level]
        return s if isinstance(s, tuple) else (s,) * self.spatial_dims

    def cumulative_stride(self, level: int) -> tuple[int, ...]:
        """How many input pixels one pixel of level ``level`` spans, per axis."""
        out = [1] * self.spatial_dims
        for i in range(level):
            out = [o * s for o, s in zip(out, self.stride_per_axis(i))]
        return tuple(out)

    @property
    def size_divisor(self) -> tuple[int, ...]:
        """Inputs are padded to multiples of this (the product of the strides) internally."""
        return self.cumulative_stride(len(self.channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channels"] = list(self.channels)
        d["strides"] = [list(s) if isinstance(s, tuple) else s for s in self.strides]
        return {"model_type": MODEL_TYPE, **d}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> AttentionResUNetConfig:
        data = dict(data)
        model_type = data.pop("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(f"{source}: model_type is {model_type!r}, expected {MODEL_TYPE!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown configuration keys {unknown}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: {exc}") from exc
