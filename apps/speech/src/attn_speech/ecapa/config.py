"""Configuration of ECAPA-TDNN models and their features, with the named variants.

Every field of :class:`EcapaConfig` is an argument of SpeechBrain's
``speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN`` under the same name, so a SpeechBrain
``hyperparams.yaml`` maps onto it one to one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

ACTIVATIONS = ("relu", "leaky_relu")


def _tuple(value) -> tuple[int, ...]:
    return tuple(int(v) for v in value)


@dataclass(frozen=True)
class EcapaConfig:
    """Architecture of the ECAPA-TDNN embedding network (Desplanques et al. 2020).

    ``channels``, ``kernel_sizes``, ``dilations`` and ``groups`` list the initial TDNN
    layer, the SE-Res2Blocks, then the multi-layer feature aggregation (MFA) layer.
    """

    input_size: int = 80
    channels: tuple[int, ...] = (512, 512, 512, 512, 1536)
    kernel_sizes: tuple[int, ...] = (5, 3, 3, 3, 1)
    dilations: tuple[int, ...] = (1, 2, 3, 4, 1)
    attention_channels: int = 128
    res2net_scale: int = 8
    se_channels: int = 128
    global_context: bool = True
    groups: tuple[int, ...] = (1, 1, 1, 1, 1)
    lin_neurons: int = 192
    activation: str = "relu"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("channels", "kernel_sizes", "dilations", "groups"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        n = len(self.channels)
        if n < 3:
            raise ValueError(f"channels needs at least 3 entries (TDNN, blocks, MFA), got {n}")
        for name in ("kernel_sizes", "dilations", "groups"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} must have {n} entries like channels")
        for k in self.kernel_sizes:
            if k % 2 == 0:
                raise ValueError(f"kernel sizes must be odd ('same' padding), got {k}")
        for c in self.channels[1:-1]:
            if c % self.res2net_scale:
                raise ValueError(
                    f"channels {c} not divisible by res2net_scale {self.res2net_scale}"
                )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")

    @classmethod
    def from_dict(cls, d: dict) -> EcapaConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ECAPA-TDNN config fields: {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class FbankConfig:
    """Log mel filterbanks as SpeechBrain's ``Fbank`` computes them (lengths in ms)."""

    sample_rate: int = 16000
    n_mels: int = 80
    n_fft: int = 400
    win_length: float = 25.0
    hop_length: float = 10.0
    f_min: float = 0.0
    f_max: float | None = None
    amin: float = 1e-10
    top_db: float = 80.0

    @property
    def hop_samples(self) -> int:
        return round(self.sample_rate / 1000.0 * self.hop_length)

    @property
    def win_samples(self) -> int:
        return round(self.sample_rate / 1000.0 * self.win_length)

    @classmethod
    def from_dict(cls, d: dict) -> FbankConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown filterbank config fields: {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class ClassifierConfig:
    """SpeechBrain's cosine ``Classifier`` head: ``lin_blocks`` BN+Linear, then classes."""

    out_neurons: int
    lin_blocks: int = 0
    lin_neurons: int = 192

    @classmethod
    def from_dict(cls, d: dict) -> ClassifierConfig:
        return cls(**d)


C1024 = (1024, 1024, 1024, 1024, 3072)

#: Named architectures: the paper's C=512 and C=1024 (the one of SpeechBrain's
#: ``spkrec-ecapa-voxceleb``) and a small one for the shipped demo model.
VARIANTS: dict[str, EcapaConfig] = {
    "ecapa_c512": EcapaConfig(),
    "ecapa_c1024": EcapaConfig(channels=C1024),
    "ecapa_c128": EcapaConfig(
        channels=(128, 128, 128, 128, 384), attention_channels=64, se_channels=64
    ),
}


def variant(name: str) -> EcapaConfig:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown ECAPA variant {name!r}; known: {sorted(VARIANTS)}") from None


def trials_label(path: str | Path) -> str:
    """What a stored threshold records of its trial list: the file name only. A directory
    names one machine's layout (often a temporary folder) and would travel with the model."""
    return Path(path).name


@dataclass
class Threshold:
    """A decision threshold on cosine scores and how it was chosen."""

    value: float
    method: str  # "eer" or "far"
    target_far: float | None = None
    trials: str | None = None  # the trial list's file name (see trials_label)
    eer: float | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> Threshold:
        return cls(**d)
