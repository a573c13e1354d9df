"""The training loop in one process: outputs, accumulation, validation, bad data, resume."""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from attn_training import BadDataError, CheckpointError, NonFiniteLossError
from attn_training.checkpoint import list_checkpoints
from attn_training.pretrained import StateDictMismatchError
from attn_training.schedule import lr_factor


def _rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _scripted(values):
    """A validation function returning ``values`` one after the other."""
    it = iter(values)
    return lambda model: {"score": next(it), "loss": 0.0}


def test_outputs_and_export(train, tiny, tmp_path):
    result, trainer = train("run", "--max-steps", "12", "--save-every", "4", "--keep-last", "2")
    run = tmp_path / "run"
    assert result.step == 12 and result.final_dir == run / "final"
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == [
        "step-00000008",
        "step-00000012",
    ]
    exported = tiny.TinyMLP.from_pretrained(run / "final")
    assert _same(exported.state_dict(), trainer.model.state_dict())
    rows = _rows(run)
    assert [int(r["step"]) for r in rows if r["train/loss"]] == list(range(1, 13))
    assert [int(r["step"]) for r in rows if r["val/loss"]] == [4, 8, 12]
    assert all(math.isfinite(float(r["train/samples_per_s"])) for r in rows if r["train/loss"])
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run / "train_config.json").read_text())["max_steps"] == 12


def test_gradient_accumulation_equals_a_larger_batch(train):
    _, small = train("a", "--max-steps", "6", "--batch-size", "2", "--grad-accum", "4")
    _, large = train("b", "--max-steps", "6", "--batch-size", "8")
    for key, value in large.model.state_dict().items():
        torch.testing.assert_close(small.model.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_logged_learning_rate_follows_the_warmup(train, tmp_path):
    train(
        "run",
        "--max-steps",
        "6",
        "--warmup-steps",
        "3",
        "--lr-schedule",
        "linear",
        "--min-lr",
        "0.001",
        "--lr",
        "0.01",
    )
    logged = [float(r["train/lr"]) for r in _rows(tmp_path / "run") if r["train/lr"]]
    expected = [
        0.01 * lr_factor(s, warmup_steps=3, total_steps=6, kind="linear", min_ratio=0.1)
        for s in range(6)
    ]
    assert logged == pytest.approx(expected, rel=1e-9)
    assert expected[:3] == pytest.approx([0.01 / 3, 0.02 / 3, 0.01])


@pytest.mark.parametrize(("mode", "best_step", "best_value"), [("min", 4, 1.0), ("max", 6, 4.0)])
def test_best_checkpoint_tracking(train, tmp_path, mode, best_step, best_value):
    result, _ = train(
        mode,
        "--max-steps",
        "8",
        "--save-every",
        "2",
        "--keep-last",
        "0",
        "--best-metric",
        "score",
        "--best-mode",
        mode,
        val_fn=_scripted([3.0, 1.0, 4.0, 2.0]),
    )
    run = tmp_path / mode
    assert result.best_value == best_value and result.best_dir == run / "best"
    record = json.loads((run / "best" / "best.json").read_text())
    assert record == {"metric": "score", "mode": mode, "value": best_value, "step": best_step}
    checkpoint = load_file(run / "checkpoints" / f"step-{best_step:08d}" / "model.safetensors")
    assert _same(load_file(run / "best" / "model.safetensors"), checkpoint)


def test_early_stopping(train, tmp_path):
    result, _ = train(
        "run",
        "--max-steps",
        "20",
        "--val-every",
        "1",
        "--early-stop",
        "2",
        "--best-metric",
        "score",
        val_fn=_scripted([3.0, 2.0, 2.5, 2.1, 9.0, 1.0]),
    )
    assert result.stopped_early and result.step == 4 and result.best_value == 2.0
    assert result.last_checkpoint.name == "step-00000004"
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_unknown_best_metric_is_named(train):
    with pytest.raises(KeyError, match="'accuracy' is not among the validation metrics"):
        train("run", "--max-steps", "2", "--save-every", "1", "--best-metric", "accuracy")


def test_bad_samples_are_logged_counted_and_skipped(train, tmp_path, caplog):
    result, trainer = train("run", "--max-steps", "16", "--bad", "3,17")
    assert result.step == 16 and result.samples_failed == 2
    assert "skipped sample /data/sample_0003.npy (index 3): OSError" in caplog.text
    assert "/data/sample_0017.npy (index 17)" in caplog.text
    train_rows = [r for r in _rows(tmp_path / "run") if r["train/loss"]]
    assert float(train_rows[-1]["train/samples_failed"]) == 2.0
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())


def test_too_many_bad_samples_stop_the_run(train):
    with pytest.raises(BadDataError, match=r"failed to load, more than --max-bad-fraction 0.05"):
        train("run", "--max-steps", "16", "--bad", ",".join(str(i) for i in range(0, 64, 4)))


def test_nan_loss_steps_are_skipped(train):
    result, trainer = train("run", "--max-steps", "16", "--nan", "5")
    assert result.skipped_steps == 1 and result.step == 16
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())


def test_consecutive_nan_losses_abort_with_the_last_checkpoint(train, tiny, tmp_path):
    calls = []

    def poisoned(model, batch):
        calls.append(1)
        loss = tiny.mse_loss(model, batch)
        return loss * float("nan") if len(calls) >= 6 else loss

    with pytest.raises(NonFiniteLossError) as info:
        train(
            "run",
            "--max-steps",
            "20",
            "--save-every",
            "4",
            "--max-nonfinite",
            "3",
            loss_fn=poisoned,
        )
    message = str(info.value)
    assert "for 3 consecutive steps (steps 6 to 8)" in message
    assert str(tmp_path / "run" / "checkpoints" / "step-00000004") in message


def test_truncated_latest_checkpoint_falls_back_and_matches(train, tmp_path, caplog):
    args = (
        "--max-steps",
        "10",
        "--keep-last",
        "0",
        "--augment",
        "--dropout",
        "0.2",
        "--ema",
        "0.8",
    )
    train("run", *args)
    run = tmp_path / "run"
    reference = load_file(run / "final" / "model.safetensors")
    latest = run / "checkpoints" / "step-00000010" / "model.safetensors"
    with open(latest, "r+b") as f:
        f.truncate(latest.stat().st_size - 7)
    caplog.set_level(logging.INFO, logger="attn_training")
    result, _ = train("run", *args, "--resume", "auto")
    assert "step-00000010 is damaged and is skipped: model.safetensors has" in caplog.text
    assert f"resumed from {run / 'checkpoints' / 'step-00000005'}" in caplog.text
    assert result.step == 10
    assert _same(load_file(run / "final" / "model.safetensors"), reference)


def test_existing_run_is_not_overwritten_without_the_flag(train, tmp_path):
    train("run", "--max-steps", "2")
    with pytest.raises(FileExistsError, match="already holds a training run"):
        train("run", "--max-steps", "2", "--resume", "none")
    result, _ = train("run", "--max-steps", "3", "--resume", "none", "--overwrite")
    assert result.step == 3
    assert [int(r["step"]) for r in _rows(tmp_path / "run") if r["train/loss"]] == [1, 2, 3]


def test_explicit_resume_path_must_be_valid(train, tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        train("run", "--max-steps", "2", "--resume", str(tmp_path / "nowhere"))


def test_init_from_with_a_new_head(train, tiny, tmp_path, caplog):
    train("base", "--max-steps", "3")
    base = tmp_path / "base" / "final"
    with pytest.raises(StateDictMismatchError, match=r"head.weight \(model \[3, 16\]"):
        train(
            "ft",
            "--max-steps",
            "1",
            "--init-from",
            str(base),
            model=tiny.TinyMLP(out_features=3),
            loss_fn=lambda m, b: m(b[0]).mean(),
            val_fn=None,
        )
    shutil.rmtree(tmp_path / "ft", ignore_errors=True)
    model = tiny.TinyMLP(out_features=3)
    train(
        "ft",
        "--max-steps",
        "1",
        "--lr",
        "1e-9",
        "--init-from",
        str(base),
        "--init-skip-mismatched",
        model=model,
        loss_fn=lambda m, b: m(b[0]).mean(),
        val_fn=None,
    )
    assert "head.bias, head.weight" in caplog.text
    weights = load_file(base / "model.safetensors")
    torch.testing.assert_close(model.body[0].weight, weights["body.0.weight"], rtol=1e-6, atol=1e-8)


def test_bf16_mixed_precision_runs_and_resumes(train, tmp_path):
    train("run", "--max-steps", "4", "--precision", "bf16")
    result, trainer = train("run", "--max-steps", "6", "--precision", "bf16")
    assert result.step == 6
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())
