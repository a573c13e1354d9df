"""A run killed with SIGKILL and resumed ends with the weights of an uninterrupted run."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attn_training.checkpoint import list_checkpoints, load_checkpoint

TINY_APP = Path(__file__).with_name("tiny_app.py")
ARGS = [
    "--max-steps",
    "30",
    "--save-every",
    "4",
    "--keep-last",
    "2",
    "--grad-accum",
    "2",
    "--augment",
    "--dropout",
    "0.2",
    "--ema",
    "0.9",
    "--warmup-steps",
    "5",
    "--clip-grad",
    "1.0",
    "--deterministic",
]


def _command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(TINY_APP), "--output-dir", str(out), *ARGS, *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(_command(reference), check=True, env=_env(), capture_output=True)

    proc = subprocess.Popen(
        _command(killed, "--sleep", "0.05"),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(killed / "checkpoints"):
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.0))  # 26 steps of >= 50 ms remain
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"kill seed {seed}"
    assert not (killed / "final").exists(), f"the run finished before the kill (seed {seed})"

    done = subprocess.run(
        _command(killed, "--resume", "auto"), env=_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stderr, f"seed {seed}"

    for name in ("model.safetensors", "ema.safetensors"):
        assert _same(
            load_file(killed / "checkpoints" / "step-00000030" / name),
            load_file(reference / "checkpoints" / "step-00000030" / name),
        ), f"{name} differs (kill seed {seed})"
    assert _same(
        load_file(killed / "final" / "model.safetensors"),
        load_file(reference / "final" / "model.safetensors"),
    )
    ours = load_checkpoint(killed / "checkpoints" / "step-00000030")
    theirs = load_checkpoint(reference / "checkpoints" / "step-00000030")
    for key, state in theirs.optimizer["state"].items():
        assert _same(ours.optimizer["state"][key], state), f"optimizer state {key} differs"
    assert ours.state == theirs.state

    with open(killed / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # rows the killed run logged after its last checkpoint were dropped on resume
    assert [int(r["step"]) for r in rows if r["train/loss"]] == list(range(1, 31))
    assert [int(r["step"]) for r in rows if r["val/loss"]] == [*range(4, 29, 4), 30]
