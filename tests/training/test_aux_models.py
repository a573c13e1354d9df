"""Auxiliary models (e.g. a GAN discriminator): own optimizer, checkpointed and resumed."""

from __future__ import annotations

import logging
import shutil

import torch
from safetensors.torch import load_file

from attn_training import AuxModel
from attn_training.checkpoint import load_checkpoint


def _critic_loss(model, batch, aux):
    """The model fits ``y``; the critic learns the model's squared error from ``x``."""
    x, y = batch
    pred = model(x)
    err = (pred - y).square()
    critic = aux["critic"](x)
    return err.mean() + (critic - err.detach()).square().mean()


def _run(train, tiny, name, *args):
    critic = tiny.TinyMLP()
    start = {k: v.clone() for k, v in critic.state_dict().items()}
    result, trainer = train(
        name, *args, loss_fn=_critic_loss, aux_models={"critic": AuxModel(critic)}
    )
    return result, trainer, critic, start


def test_both_networks_train_and_are_checkpointed(train, tiny, tmp_path):
    result, _trainer, critic, start = _run(train, tiny, "run", "--max-steps", "6")
    assert any(not torch.equal(start[k], v) for k, v in critic.state_dict().items())
    content = load_checkpoint(result.last_checkpoint)
    assert set(content.aux) == {"critic"}
    saved = content.aux["critic"]
    assert all(torch.equal(saved.model[k], v) for k, v in critic.state_dict().items())
    assert saved.optimizer["state"] and saved.scheduler is not None
    # the exported model is the main one only
    assert not (tmp_path / "run" / "final" / "aux").exists()


def test_resume_repeats_an_uninterrupted_run(train, tiny, tmp_path):
    args = ("--max-steps", "10", "--keep-last", "0")
    _run(train, tiny, "run", *args)
    run = tmp_path / "run" / "checkpoints"
    model_ref = load_file(run / "step-00000010" / "model.safetensors")
    critic_ref = load_file(run / "step-00000010" / "aux" / "critic" / "model.safetensors")
    shutil.rmtree(run / "step-00000010")
    result, _, critic, _ = _run(train, tiny, "run", *args, "--resume", "auto")
    assert result.step == 10
    model_now = load_file(run / "step-00000010" / "model.safetensors")
    assert all(torch.equal(model_now[k], v) for k, v in model_ref.items())
    assert all(torch.equal(critic.state_dict()[k], v) for k, v in critic_ref.items())


def test_resuming_a_run_without_the_auxiliary_model_warns(train, tiny, tmp_path, caplog):
    train("run", "--max-steps", "5")
    caplog.set_level(logging.WARNING, logger="attn_training")
    result, _, _, _ = _run(train, tiny, "run", "--max-steps", "8", "--resume", "auto")
    assert result.step == 8
    assert "has no auxiliary model 'critic'" in caplog.text
