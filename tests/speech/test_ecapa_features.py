"""Filterbank features against SpeechBrain's Fbank + sentence mean normalisation, and the
independence of an item's features and embedding from its batch-mates."""

from __future__ import annotations

import pytest
import torch
from speechbrain.lobes.features import Fbank as SBFbank
from speechbrain.processing.features import InputNormalization

from attn_speech.ecapa.config import EcapaConfig
from attn_speech.ecapa.features import Fbank
from attn_speech.ecapa.inference import Embedder, pad_batch
from attn_speech.ecapa.lengths import frames_from_relative, relative_from_frames
from attn_speech.ecapa.model import EcapaTDNN
from attn_speech.ecapa.speaker import load_model


@pytest.mark.parametrize("samples", [8000, 16001, 23457, 48000])
def test_features_equal_speechbrain(samples):
    wav = torch.randn(2, samples) * torch.tensor([[0.05], [0.5]])
    wav[1, : samples // 3] = 0.0  # a silent stretch exercises the top_db floor
    ref = InputNormalization(norm_type="sentence", std_norm=False)(
        SBFbank(n_mels=80)(wav), torch.ones(2)
    )
    ours, lengths = Fbank()(wav)
    assert ours.shape == ref.shape == (2, samples // 160 + 1, 80)
    assert (ours - ref).abs().max() < 1e-4
    assert torch.equal(
        frames_from_relative(lengths, 2, ours.shape[1]), torch.full((2,), ours.shape[1])
    )


def test_padded_batch_features_equal_single_items():
    wavs = [torch.randn(n) * 0.1 for n in (7999, 16000, 12345)]
    batch, wav_lens = pad_batch(wavs)
    feats, lengths = Fbank()(batch, wav_lens)
    frames = frames_from_relative(lengths, 3, feats.shape[1])
    for i, w in enumerate(wavs):
        alone, _ = Fbank()(w[None])
        assert frames[i] == alone.shape[1] == w.numel() // 160 + 1
        torch.testing.assert_close(feats[i, : frames[i]], alone[0], atol=1e-5, rtol=0)
        assert torch.all(feats[i, frames[i] :] == 0)


def test_relative_lengths_round_trip_exactly():
    for t in range(1, 800, 7):
        frames = torch.arange(1, t + 1)
        rel = relative_from_frames(frames, t)
        assert rel.dtype == torch.float32
        assert torch.equal(frames_from_relative(rel, t, t), frames)


def test_embedding_does_not_depend_on_batch_mates():
    cfg = EcapaConfig(channels=(64, 64, 64, 64, 192), attention_channels=16, se_channels=16)
    model = EcapaTDNN(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    wavs = [torch.randn(n) * 0.1 for n in (8000, 30011, 15555)]
    batch, wav_lens = pad_batch(wavs)
    fbank = Fbank()
    with torch.no_grad():
        feats, lengths = fbank(batch, wav_lens)
        together = model(feats, lengths)[:, 0]
        for i, w in enumerate(wavs):
            alone = model(*fbank(w[None]))[0, 0]
            torch.testing.assert_close(together[i], alone, atol=2e-5, rtol=1e-5)


def test_bfloat16_embeddings_stay_close(tiny_model):
    model = load_model(tiny_model)
    wavs = [torch.randn(n) * 0.1 for n in (12000, 20011)]
    full = Embedder(model).embed_waveforms(wavs)
    half = Embedder(model, precision="bf16").embed_waveforms(wavs)
    assert half.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(full, half).min() > 0.999
    assert next(model.parameters()).dtype == torch.float32  # the model itself is untouched
