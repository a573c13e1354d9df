"""Two CPU processes (gloo) through torchrun: same weights on both ranks, equal to one process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TINY_APP = Path(__file__).with_name("tiny_app.py")
COMMON = [
    "--max-steps",
    "12",
    "--save-every",
    "6",
    "--augment",
    "--clip-grad",
    "5.0",
    "--keep-last",
    "0",
    "--warmup-steps",
    "3",
    "--ema",
    "0.9",
    "--dump-rank-weights",
]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun() -> list[str]:
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


def _run_two(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            *_torchrun(),
            "--standalone",
            "--nproc_per_node",
            "2",
            str(TINY_APP),
            "--output-dir",
            str(out),
            "--batch-size",
            "4",
            *COMMON,
            *extra,
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    ddp = _run_two(two)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    single = subprocess.run(
        [sys.executable, str(TINY_APP), "--output-dir", str(one), "--batch-size", "8", *COMMON],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-4000:]

    rank0, rank1 = load_file(two / "rank0.safetensors"), load_file(two / "rank1.safetensors")
    reference = load_file(one / "rank0.safetensors")
    for key, value in reference.items():
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        load_file(two / "final" / "model.safetensors"),
        load_file(one / "final" / "model.safetensors"),
        rtol=1e-5,
        atol=1e-6,
    )

    # Every rank's random state is in the checkpoint, and a two-process run resumed from
    # an older checkpoint (the newest one damaged) repeats its own result exactly.
    checkpoint = two / "checkpoints" / "step-00000012"
    rng = load_file(checkpoint / "rng.safetensors")
    assert rng["torch.cpu"].shape[0] == 2
    assert not torch.equal(rng["torch.cpu"][0], rng["torch.cpu"][1])
    with open(checkpoint / "optimizer.pt", "r+b") as f:
        f.truncate(100)
    resumed = _run_two(two, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stderr and "step-00000006" in resumed.stderr
    for rank in (0, 1):
        assert torch.equal(
            torch.cat([v.flatten() for v in load_file(two / f"rank{rank}.safetensors").values()]),
            torch.cat([v.flatten() for v in (rank0 if rank == 0 else rank1).values()]),
        )
