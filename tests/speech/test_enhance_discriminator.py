"""The metric discriminator (MP-SENet / MetricGAN): shapes, PESQ targets, one training step
that updates both networks, and resume."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from pesq import pesq
from safetensors.torch import load_file

from attn_speech.cli import main
from attn_speech.enhance.discriminator import (
    MetricDiscriminator,
    discriminator_loss,
    metric_loss,
    normalised_pesq,
    pesq_targets,
)
from attn_speech.enhance.model import MambAttention
from attn_speech.enhance.train import DISCRIMINATOR, make_loss_fn
from attn_training import AuxModel, TrainConfig, Trainer

TINY = {"channels": 8, "num_blocks": 1, "num_heads": 2, "d_state": 4, "expand": 2}
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng missing")


@pytest.fixture(scope="module")
def speech():
    """Two espeak-ng utterances (float32, 16 kHz) cut to 1.2 s."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng missing")
    from attn_speech.corpus import make_voices, synthesise

    rng = random.Random(0)
    voices = make_voices(2, seed=0)
    texts = ("the quick brown fox jumps over the lazy dog", "seven green apples fell today")
    return [synthesise(v, t, rng)[4000:23200] for v, t in zip(voices, texts, strict=True)]


def test_shapes_and_range():
    torch.manual_seed(0)
    disc = MetricDiscriminator(dim=8)
    clean, other = torch.rand(3, 201, 41), torch.rand(3, 201, 41)
    score = disc(clean, other)
    assert score.shape == (3,)
    assert bool(((score >= 0) & (score <= 1)).all())
    loss = metric_loss(disc, clean, other.requires_grad_())
    loss.backward()
    # the generator's metric loss reaches the enhanced spectrum, never D's weights
    assert other.grad is not None and other.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.parameters())


def test_discriminator_loss_trains_only_d_and_skips_invalid_items():
    torch.manual_seed(0)
    disc = MetricDiscriminator(dim=8)
    clean, est = torch.rand(2, 201, 41), torch.rand(2, 201, 41, requires_grad=True)
    targets, valid = torch.tensor([0.3, 0.0]), torch.tensor([True, False])
    loss = discriminator_loss(disc, clean, est, targets, valid)
    loss.backward()
    assert est.grad is None
    assert all(p.grad is not None for p in disc.parameters() if p.requires_grad)
    # no valid item: only the clean-vs-clean term
    disc.eval()
    none = discriminator_loss(disc, clean, est, targets, torch.tensor([False, False]))
    real = disc(clean, clean)
    torch.testing.assert_close(none, torch.nn.functional.mse_loss(real, torch.ones(2)))


def test_pesq_targets_match_a_direct_call(speech):
    rng = np.random.default_rng(0)
    clean = np.stack(speech)
    noisy = clean + 0.05 * rng.standard_normal(clean.shape).astype(np.float32)
    silent = np.zeros_like(clean[0])
    targets, valid = pesq_targets(
        torch.from_numpy(np.concatenate([clean, clean[:1]])),
        torch.from_numpy(np.concatenate([noisy, silent[None]])),
    )
    assert valid.tolist() == [True, True, False]  # a silent estimate is not scored
    for i in range(2):
        direct = pesq(16000, clean[i].astype(np.float64), noisy[i].astype(np.float64), "wb")
        assert targets[i].item() == pytest.approx((direct - 1) / 3.5, abs=1e-6)
        assert targets[i].item() == pytest.approx(normalised_pesq(direct), abs=1e-6)
    assert normalised_pesq(4.5) == pytest.approx(1.0)
    # a silent reference cannot be scored
    _, valid = pesq_targets(torch.zeros(1, 16000), torch.from_numpy(noisy[:1]))
    assert valid.tolist() == [False]


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, speech):
        rng = np.random.default_rng(1)
        self.items = [
            (torch.from_numpy(x), torch.from_numpy(x + 0.05 * rng.standard_normal(x.size)).float())
            for x in speech
        ]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_one_step_updates_both_networks(speech, tmp_path):
    torch.manual_seed(0)
    model, disc = MambAttention(**TINY), MetricDiscriminator(dim=8)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (model, disc)]
    config = TrainConfig(
        output_dir=tmp_path / "run", max_steps=1, batch_size=2, num_workers=0, progress=False
    )
    values = {}
    loss_fn = make_loss_fn(model.stft, metric_discriminator=True)

    def spy(model, batch, aux):
        loss, logged = loss_fn(model, batch, aux)
        values.update(logged)
        return loss, logged

    Trainer(
        model, _Pairs(speech), config, loss_fn=spy, aux_models={DISCRIMINATOR: AuxModel(disc)}
    ).fit()
    for m, start in zip((model, disc), before, strict=True):
        changed = [k for k, v in m.state_dict().items() if not torch.equal(v, start[k])]
        assert changed
    assert {"metric", "discriminator", "generator", "pesq_norm"} <= set(values)
    assert 0 < float(values["pesq_norm"]) < 1
    saved = tmp_path / "run" / "checkpoints" / "step-00000001" / "aux" / DISCRIMINATOR
    assert (saved / "model.safetensors").is_file() and (saved / "optimizer.pt").is_file()


@needs_espeak
def test_cli_resume_keeps_the_discriminator(speech, tmp_path):
    clean, noisy = tmp_path / "clean", tmp_path / "noisy"
    clean.mkdir()
    noisy.mkdir()
    for i, (c, n) in enumerate(_Pairs(speech).items):
        sf.write(clean / f"{i}.wav", c.numpy(), 16000)
        sf.write(noisy / f"{i}.wav", n.numpy(), 16000)
    out = tmp_path / "run"
    argv = ["enhance", "train", "--clean", str(clean), "--noisy", str(noisy), "--channels", "8"]
    argv += ["--blocks", "1", "--heads", "2", "--d-state", "4", "--expand", "2"]
    argv += ["--segment-seconds", "1.0", "--batch-size", "2", "--max-steps", "2"]
    argv += ["--output-dir", str(out), "--num-workers", "0", "--no-progress"]
    argv += ["--save-every", "1", "--keep-last", "0", "--metric-discriminator"]
    argv += ["--disc-channels", "8"]
    assert main(argv) == 0
    last = out / "checkpoints" / "step-00000002"
    ref = load_file(last / "aux" / DISCRIMINATOR / "model.safetensors")
    first = load_file(
        out / "checkpoints" / "step-00000001" / "aux" / DISCRIMINATOR / "model.safetensors"
    )
    assert any(not torch.equal(first[k], v) for k, v in ref.items())
    shutil.rmtree(last)
    assert main([*argv, "--resume", "auto"]) == 0
    again = load_file(last / "aux" / DISCRIMINATOR / "model.safetensors")
    assert ref.keys() == again.keys()
    for k, v in ref.items():
        torch.testing.assert_close(again[k], v, rtol=0, atol=0)
