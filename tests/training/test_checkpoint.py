"""Checkpoint folders: atomic writes, manifest validation, selection, retention."""

from __future__ import annotations

import json

import pytest
import torch

from attn_training.checkpoint import (
    CheckpointContent,
    CheckpointError,
    find_latest_valid,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from attn_training.fsutil import atomic_folder, remove_stale_temporaries


def _content(step: int) -> CheckpointContent:
    return CheckpointContent(
        model={"w": torch.full((64,), float(step)), "b": torch.arange(3)},
        optimizer={"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1}]},
        state={"step": step},
        rng={"torch.cpu": torch.get_rng_state().unsqueeze(0)},
        scheduler={"last_epoch": step},
    )


def test_round_trip(tmp_path):
    folder = save_checkpoint(tmp_path, 12, _content(12))
    assert folder.name == "step-00000012"
    assert verify_checkpoint(folder) is None
    loaded = load_checkpoint(folder)
    assert torch.equal(loaded.model["w"], torch.full((64,), 12.0))
    assert loaded.state == {"step": 12} and loaded.scheduler == {"last_epoch": 12}
    assert torch.equal(loaded.optimizer["state"][0]["exp_avg"], torch.ones(2))
    assert loaded.ema is None and loaded.scaler is None


def test_truncation_and_corruption_are_detected(tmp_path):
    folder = save_checkpoint(tmp_path, 1, _content(1))
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert "model.safetensors has" in verify_checkpoint(folder)
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert "SHA-256" in verify_checkpoint(folder)
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(folder)
    (folder / "manifest.json").unlink()
    assert "no manifest.json" in verify_checkpoint(folder)


def test_latest_valid_skips_damaged_newer_ones(tmp_path, caplog):
    for step in (5, 10, 15):
        save_checkpoint(tmp_path, step, _content(step))
    with open(tmp_path / "step-00000015" / "optimizer.pt", "r+b") as f:
        f.truncate(10)
    best, damaged = find_latest_valid(tmp_path)
    assert best == tmp_path / "step-00000010"
    assert [p.name for p, _ in damaged] == ["step-00000015"]
    assert "step-00000015 is damaged" in caplog.text


def test_failed_write_leaves_the_previous_folder(tmp_path):
    save_checkpoint(tmp_path, 3, _content(3))

    def fail_midway():
        with atomic_folder(tmp_path / "step-00000003") as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        fail_midway()
    assert verify_checkpoint(tmp_path / "step-00000003") is None
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000003"]


def test_interrupted_swap_is_repaired(tmp_path):
    (tmp_path / ".tmp-best-1234abcd").mkdir()
    old = tmp_path / ".old-best-89abcdef"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"a": 1}))
    remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    assert json.loads((tmp_path / "best" / "config.json").read_text()) == {"a": 1}


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 10, 100):
        save_checkpoint(tmp_path, step, _content(step))
    removed = prune_checkpoints(tmp_path, 2)
    assert [p.name for p in removed] == ["step-00000001", "step-00000002"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000010", "step-00000100"]
    assert prune_checkpoints(tmp_path, 0) == []
