"""The complete speaker model: waveforms -> features -> ECAPA-TDNN embedding (-> classes).

:class:`EcapaSpeaker` is what a checkpoint folder holds (``model.safetensors`` +
``config.json``, through ``attn_training.pretrained.PretrainedMixin``): the architecture,
the filterbank settings, the optional classifier head with its speaker labels, the optional
embedding mean of SpeechBrain's ``mean_var_norm_emb``, and the calibrated threshold.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from attn_speech.ecapa.config import ClassifierConfig, EcapaConfig, FbankConfig, Threshold
from attn_speech.ecapa.features import Fbank
from attn_speech.ecapa.model import CosineClassifier, EcapaTDNN
from attn_training.pretrained import PretrainedMixin, save_pretrained_state


def _as(cls, value):
    return cls.from_dict(value) if isinstance(value, dict) else value


class EcapaSpeaker(PretrainedMixin, nn.Module):
    """Speaker embeddings and (optionally) speaker classification from raw waveforms.

    Args:
        model: the ECAPA-TDNN architecture (:class:`EcapaConfig` or its dict).
        features: filterbank settings; ``n_mels`` must equal ``model.input_size``.
        classifier: the cosine classifier head, or ``None`` for an embedding-only model.
        labels: speaker names of the classifier's classes, in class order.
        threshold: calibrated decision threshold on cosine scores (:class:`Threshold` dict).
        embedding_norm: hold a global embedding mean (SpeechBrain's ``mean_var_norm_emb``)
            that :meth:`embed` subtracts when asked to.
        source: free-form provenance (e.g. the SpeechBrain folder it was imported from).

    Shapes:
        ``embed(wavs, wav_lens)``: ``[B, samples]`` at ``features.sample_rate`` and ``[B]``
        relative lengths -> ``[B, lin_neurons]``. ``forward`` returns the classifier's
        cosines ``[B, out_neurons]``.
    """

    def __init__(
        self,
        model: EcapaConfig | dict | None = None,
        features: FbankConfig | dict | None = None,
        classifier: ClassifierConfig | dict | None = None,
        labels: list[str] | None = None,
        threshold: Threshold | dict | None = None,
        embedding_norm: bool = False,
        source: dict | None = None,
    ) -> None:
        super().__init__()
        model_cfg = _as(EcapaConfig, model) or EcapaConfig()
        fbank_cfg = _as(FbankConfig, features) or FbankConfig(n_mels=model_cfg.input_size)
        if fbank_cfg.n_mels != model_cfg.input_size:
            raise ValueError(
                f"features.n_mels ({fbank_cfg.n_mels}) != model.input_size ({model_cfg.input_size})"
            )
        head_cfg = _as(ClassifierConfig, classifier)
        if labels is not None and head_cfg is not None and len(labels) != head_cfg.out_neurons:
            raise ValueError(f"{len(labels)} labels for {head_cfg.out_neurons} classes")
        self.model_config = model_cfg
        self.fbank_config = fbank_cfg
        self.classifier_config = head_cfg
        self.labels = list(labels) if labels is not None else None
        self.threshold = _as(Threshold, threshold)
        self.source = dict(source or {})
        self.compute_features = Fbank(fbank_cfg)
        self.embedding_model = EcapaTDNN(model_cfg)
        self.classifier = (
            CosineClassifier(model_cfg.lin_neurons, head_cfg) if head_cfg is not None else None
        )
        if embedding_norm:
            self.register_buffer("embedding_mean", torch.zeros(model_cfg.lin_neurons))
        else:
            self.embedding_mean = None

    @property
    def sample_rate(self) -> int:
        return self.fbank_config.sample_rate

    @property
    def embedding_size(self) -> int:
        return self.model_config.lin_neurons

    def embed(
        self,
        wavs: torch.Tensor,
        wav_lens: torch.Tensor | None = None,
        normalize: bool = False,
    ) -> torch.Tensor:
        """Embeddings ``[B, lin_neurons]``; ``normalize`` subtracts the stored embedding mean."""
        feats, lengths = self.compute_features(wavs, wav_lens)
        emb = self.embedding_model(feats, lengths).squeeze(1)
        if normalize:
            if self.embedding_mean is None:
                raise ValueError("this model holds no embedding mean (embedding_norm=False)")
            emb = emb - self.embedding_mean
        return emb

    def forward(self, wavs: torch.Tensor, wav_lens: torch.Tensor | None = None) -> torch.Tensor:
        if self.classifier is None:
            raise RuntimeError("this model has no classifier head")
        emb = self.embed(wavs, wav_lens)
        return self.classifier(emb.unsqueeze(1)).squeeze(1)

    def with_threshold(self, threshold: Threshold | None) -> EcapaSpeaker:
        """A copy of this model (same weights) carrying ``threshold``."""
        config = self.pretrained_config
        config["threshold"] = threshold
        other = type(self)(**config)
        other.load_state_dict(self.state_dict())
        return other.to(next(self.parameters()).device).train(self.training)

    def with_new_head(self, labels: list[str], lin_blocks: int | None = None) -> EcapaSpeaker:
        """A copy with this embedding network and a freshly initialised classifier over
        ``labels`` (fine-tuning on new speakers)."""
        config = self.pretrained_config
        base = self.classifier_config or ClassifierConfig(out_neurons=len(labels))
        head = replace(
            base,
            out_neurons=len(labels),
            lin_blocks=base.lin_blocks if lin_blocks is None else lin_blocks,
        )
        config.update(classifier=head, labels=list(labels), threshold=None)
        other = type(self)(**config)
        other.embedding_model.load_state_dict(self.embedding_model.state_dict())
        if self.embedding_mean is not None:
            other.embedding_mean.copy_(self.embedding_mean)
        return other

    def describe(self) -> str:
        n = sum(p.numel() for p in self.embedding_model.parameters())
        head = (
            f", classifier over {self.classifier_config.out_neurons} speakers"
            if self.classifier_config
            else ""
        )
        return f"ECAPA-TDNN C={self.model_config.channels[0]} ({n / 1e6:.2f} M parameters{head})"


def save_model(model: EcapaSpeaker, folder: str | Path) -> Path:
    """``save_pretrained`` that keeps the JSON side files already in ``folder`` (e.g. the
    harness's ``best.json``) when it replaces a model folder."""
    folder = Path(folder)
    keep = {}
    if folder.is_dir():
        for path in folder.glob("*.json"):
            if path.name not in ("config.json", "model.safetensors.index.json"):
                keep[path.name] = json.loads(path.read_text())
    return save_pretrained_state(
        folder, model.state_dict(), model.pretrained_config, extra_json=keep
    )


def load_model(path: str | Path, device: str | torch.device = "cpu") -> EcapaSpeaker:
    """Load a checkpoint folder written by ``save_pretrained`` (strict keys and shapes)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: not a model folder (no config.json); SpeechBrain folders go through "
            "'attn-speech ecapa import-speechbrain' first"
        )
    return EcapaSpeaker.from_pretrained(path, map_location=device)
