"""Our ECAPA-TDNN against SpeechBrain's with the same (random) weights, through the
``import-speechbrain`` command; strict and safe loading of foreign checkpoints."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from speechbrain.lobes.features import Fbank as SBFbank
from speechbrain.processing.features import InputNormalization

from attn_speech.cli import main
from attn_speech.ecapa.speaker import load_model
from attn_speech.ecapa.speechbrain_import import SpeechBrainImportError, import_speechbrain
from attn_training.pretrained import StateDictMismatchError


def speechbrain_embedding(sb_model, wav: torch.Tensor) -> torch.Tensor:
    """SpeechBrain's encode_batch for one waveform: Fbank, sentence mean norm, ECAPA."""
    feats = SBFbank(n_mels=80)(wav[None])
    feats = InputNormalization(norm_type="sentence", std_norm=False)(feats, torch.ones(1))
    return sb_model(feats, torch.ones(1))[0, 0]


def waveforms(corpus_wav: torch.Tensor) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    noise = [0.1 * torch.randn(n, generator=gen) for n in (8013, 27211)]
    return [*noise, corpus_wav]


@pytest.mark.parametrize("channels", [512, 1024])
def test_imported_model_matches_speechbrain(channels, speechbrain_folder, corpus, tmp_path):
    folder, sb_model, sb_head, sb_mean = speechbrain_folder(channels)
    out = tmp_path / "ours"
    assert main(["ecapa", "import-speechbrain", str(folder), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    model = load_model(out)
    assert model.model_config.channels == (channels,) * 4 + (3 * channels,)
    assert model.labels == [f"id{10000 + i}" for i in range(7)]
    torch.testing.assert_close(model.embedding_mean, sb_mean)

    speech, rate = sf.read(corpus / "wav/spk000/spk000_u00.wav", dtype="float32")
    assert rate == 16000
    with torch.no_grad():
        for wav in waveforms(torch.from_numpy(speech)):
            ref = speechbrain_embedding(sb_model, wav)
            ours = model.embed(wav[None])[0]
            cos = torch.nn.functional.cosine_similarity(ours, ref, dim=0)
            assert cos > 0.9999, cos
            assert (ours - ref).abs().max() < 1e-4
            torch.testing.assert_close(
                model.classifier(ours[None, None]), sb_head(ref[None, None]), atol=1e-5, rtol=0
            )


def test_embed_command_batches_match_speechbrain_alone(speechbrain_folder, tmp_path):
    """Padded batches of different lengths give each file its single-file embedding."""
    folder, sb_model, _, _ = speechbrain_folder(512)
    gen = torch.Generator().manual_seed(11)
    files, refs = [], []
    for i, n in enumerate((9001, 31000, 16000, 20117)):
        wav = 0.1 * torch.randn(n, generator=gen)
        path = tmp_path / f"f{i}.wav"
        sf.write(path, wav.numpy(), 16000, subtype="FLOAT")
        files.append(str(path))
        with torch.no_grad():
            refs.append(speechbrain_embedding(sb_model, wav).numpy())
    out = tmp_path / "emb"
    args = ["ecapa", "embed", *files, "--model", str(folder), "--out", str(out)]
    assert main([*args, "--batch-size", "4", "--no-progress"]) == 0
    emb = np.load(out / "embeddings.npy")
    assert emb.dtype == np.float32 and emb.shape == (4, 192)
    index = (out / "index.csv").read_text().splitlines()
    assert index == ["row,path"] + [f"{i},{f}" for i, f in enumerate(files)]
    np.testing.assert_allclose(emb, np.stack(refs), atol=1e-4, rtol=0)


def _damage(src, dst, edit):
    shutil.copytree(src, dst)
    state = torch.load(dst / "embedding_model.ckpt", weights_only=True)
    edit(state)
    torch.save(state, dst / "embedding_model.ckpt")
    return dst


def test_strict_loading_names_every_bad_key(speechbrain_folder, tmp_path):
    folder = speechbrain_folder(512)[0]

    def edit(state):
        del state["blocks.1.tdnn1.conv.conv.weight"]
        del state["asp.conv.conv.bias"]
        state["blocks.9.extra"] = torch.zeros(3)
        state["fc.conv.weight"] = torch.zeros(10, 3072, 1)

    bad = _damage(folder, tmp_path / "bad", edit)
    with pytest.raises(StateDictMismatchError) as info:
        import_speechbrain(bad)
    msg = str(info.value)
    for key in (
        "blocks.1.tdnn1.conv.conv.weight",
        "asp.conv.conv.bias",
        "blocks.9.extra",
        "fc.conv.weight",
        "embedding_model.ckpt",
    ):
        assert key in msg
    assert main(["ecapa", "import-speechbrain", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


class Payload:
    """Anything whose unpickling would run code."""

    def __reduce__(self):
        return (shutil.rmtree, ("/nonexistent-attn-speech-test",))


def test_checkpoints_are_never_unpickled(speechbrain_folder, tmp_path):
    folder = speechbrain_folder(512)[0]
    bad = tmp_path / "pickled"
    shutil.copytree(folder, bad)
    state = torch.load(bad / "embedding_model.ckpt", weights_only=True)
    state["payload"] = Payload()
    torch.save(state, bad / "embedding_model.ckpt")
    with pytest.raises(ValueError, match="weights-only"):
        import_speechbrain(bad)


def test_hyperparams_are_parsed_not_executed(speechbrain_folder, tmp_path):
    folder = speechbrain_folder(512)[0]
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    marker = tmp_path / "executed"
    yaml = (copy / "hyperparams.yaml").read_text()
    yaml += f"\n__hook: !apply:pathlib.Path.touch [!new:pathlib.Path ['{marker}']]\n"
    (copy / "hyperparams.yaml").write_text(yaml)
    model, _ = import_speechbrain(copy)
    assert model.model_config.channels[0] == 512
    assert not marker.exists()


def test_architecture_comes_from_the_yaml(speechbrain_folder, tmp_path):
    folder = speechbrain_folder(512)[0]
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    yaml = (copy / "hyperparams.yaml").read_text()
    (copy / "hyperparams.yaml").write_text(
        yaml.replace("attention_channels: 128", "attention_channels: 64")
    )
    with pytest.raises(StateDictMismatchError, match=r"asp\.tdnn\.conv\.conv\.weight"):
        import_speechbrain(copy)
    (copy / "hyperparams.yaml").write_text(yaml.replace("std_norm: False", "std_norm: True", 1))
    with pytest.raises(SpeechBrainImportError, match="mean_var_norm"):
        import_speechbrain(copy)
