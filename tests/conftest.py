"""Suite-wide test configuration: the ``gpu`` marker is skipped where CUDA is absent; the
``without_compiler`` fixture."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (marker gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seeded():
    """Each test draws its random inputs from a fixed seed (reproducible failures)."""
    torch.manual_seed(0)


@pytest.fixture
def without_compiler(tmp_path):
    """``without_compiler(script)``: runs the Python source ``script`` (dedented) in a fresh
    interpreter whose ``CXX`` names no compiler and whose kernel cache is empty, so that no
    compiled CPU kernel of :mod:`core_attention.native` builds; fails the test with the
    child's error output unless it exits 0, and returns its standard output."""

    def run(script: str) -> str:
        env = dict(
            os.environ,
            CXX=str(tmp_path / "no-such-compiler"),
            XDG_CACHE_HOME=str(tmp_path / "kernel-cache"),
        )
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    return run
