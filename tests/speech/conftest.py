"""Fixtures of the speech tests: SpeechBrain-format ECAPA folders with random weights (the
layout of spkrec-ecapa-voxceleb) and a small espeak-ng speaker corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from speechbrain.dataio.encoder import CategoricalEncoder
from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN, Classifier
from speechbrain.processing.features import InputNormalization

HPARAMS = """\
# ############################################################################
# Model: ECAPA big for Speaker verification (layout of spkrec-ecapa-voxceleb)
# ############################################################################

n_mels: 80
pretrained_path: {path}
out_n_neurons: {classes}

compute_features: !new:speechbrain.lobes.features.Fbank
    n_mels: !ref <n_mels>

mean_var_norm: !new:speechbrain.processing.features.InputNormalization
    norm_type: sentence
    std_norm: False

embedding_model: !new:speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN
    input_size: !ref <n_mels>
    channels: [{c}, {c}, {c}, {c}, {c3}]
    kernel_sizes: [5, 3, 3, 3, 1]
    dilations: [1, 2, 3, 4, 1]
    attention_channels: 128
    lin_neurons: 192

classifier: !new:speechbrain.lobes.models.ECAPA_TDNN.Classifier
    input_size: 192
    out_neurons: !ref <out_n_neurons>

mean_var_norm_emb: !new:speechbrain.processing.features.InputNormalization
    norm_type: global
    std_norm: False

modules:
    compute_features: !ref <compute_features>
    mean_var_norm: !ref <mean_var_norm>
    embedding_model: !ref <embedding_model>
    mean_var_norm_emb: !ref <mean_var_norm_emb>
    classifier: !ref <classifier>

label_encoder: !new:speechbrain.dataio.encoder.CategoricalEncoder

pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        embedding_model: !ref <embedding_model>
        mean_var_norm_emb: !ref <mean_var_norm_emb>
        classifier: !ref <classifier>
        label_encoder: !ref <label_encoder>
    paths:
        embedding_model: !ref <pretrained_path>/embedding_model.ckpt
        mean_var_norm_emb: !ref <pretrained_path>/mean_var_norm_emb.ckpt
        classifier: !ref <pretrained_path>/classifier.ckpt
        label_encoder: !ref <pretrained_path>/label_encoder.txt
"""


def randomise_batchnorm(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Running statistics and affine parameters far from their defaults."""
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 1.5 + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.5)


def make_speechbrain_folder(
    folder: Path, channels: int = 512, classes: int = 7, seed: int = 0
) -> tuple[Path, ECAPA_TDNN, Classifier, torch.Tensor]:
    """Write hyperparams.yaml, embedding_model.ckpt, classifier.ckpt, mean_var_norm_emb.ckpt
    and label_encoder.txt; returns the folder, the two SpeechBrain modules and the mean."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    model = ECAPA_TDNN(80, channels=[channels] * 4 + [channels * 3], lin_neurons=192)
    with torch.no_grad():
        randomise_batchnorm(model, gen)
    model.eval()
    head = Classifier(input_size=192, out_neurons=classes).eval()
    torch.save(model.state_dict(), folder / "embedding_model.ckpt")
    torch.save(head.state_dict(), folder / "classifier.ckpt")
    emb_norm = InputNormalization(norm_type="global", std_norm=False)
    emb_norm.train()
    emb_norm(torch.randn(16, 1, 192, generator=gen) + 3.0, torch.ones(16))
    emb_norm._save(folder / "mean_var_norm_emb.ckpt")
    enc = CategoricalEncoder()
    enc.update_from_iterable([f"id{10000 + i}" for i in range(classes)])
    enc.save(folder / "label_encoder.txt")
    (folder / "hyperparams.yaml").write_text(
        HPARAMS.format(path=folder, classes=classes, c=channels, c3=3 * channels)
    )
    return folder, model, head, emb_norm.glob_mean.reshape(-1).clone()


@pytest.fixture(scope="session")
def speechbrain_folder(tmp_path_factory):
    """``make(channels)`` -> (folder, SpeechBrain ECAPA_TDNN, Classifier, embedding mean)."""
    made = {}

    def make(channels: int = 512):
        if channels not in made:
            root = tmp_path_factory.mktemp(f"sb{channels}")
            made[channels] = make_speechbrain_folder(root / "model", channels, seed=channels)
        return made[channels]

    return make


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """12 espeak-ng voices x 6 utterances, 4 held-out test voices with a trial list."""
    from attn_speech.corpus import make_speaker_corpus

    root = tmp_path_factory.mktemp("corpus") / "speakers"
    make_speaker_corpus(root, speakers=12, utterances=6, test_speakers=4, seed=3, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A small random EcapaSpeaker (C=32) saved as a model folder."""
    from attn_speech.ecapa.config import EcapaConfig, FbankConfig
    from attn_speech.ecapa.speaker import EcapaSpeaker

    torch.manual_seed(1)
    cfg = EcapaConfig(channels=(32, 32, 32, 32, 96), attention_channels=16, se_channels=16)
    model = EcapaSpeaker(model=cfg, features=FbankConfig()).eval()
    with torch.no_grad():
        randomise_batchnorm(model, torch.Generator().manual_seed(2))
    path = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(path)
    return path


@pytest.fixture
def random_batchnorm():
    """``random_batchnorm(model)``: :func:`randomise_batchnorm` with a seed drawn from
    torch's global generator (so a test's ``torch.manual_seed`` fixes it); returns
    ``model``, so that folded BatchNorms are tested with more than the identity."""

    def randomise(model: torch.nn.Module) -> torch.nn.Module:
        seed = int(torch.randint(2**31 - 1, ()))
        with torch.no_grad():
            randomise_batchnorm(model, torch.Generator().manual_seed(seed))
        return model

    return randomise
