"""keep_freed_memory: freed activation-sized blocks stay in the process (no page faults when
the next call allocates them again)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from core_attention import cpu_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

_SCRIPT = """
import resource, sys, torch
from core_attention.cpu_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory() and keep_freed_memory()
faults = 0
for step in range(8):  # a network call: four 6 MiB activations alive at once, then freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.empty(6 << 20, dtype=torch.uint8).fill_(1) for _ in range(4)]
    del blocks
    if step >= 2:  # after glibc's own threshold adjustment
        faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults)
"""


def _faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason="a glibc setting")
def test_freed_blocks_are_reused_without_page_faults():
    pages = 6 * 4 * (6 << 20) // 4096  # six steps of four 6 MiB blocks
    assert _faults("default") > pages // 4  # glibc hands most of the heap top back
    assert _faults("keep") < pages // 50


def test_does_nothing_without_glibc(monkeypatch):
    monkeypatch.setattr(cpu_memory, "_done", None)
    monkeypatch.setattr(cpu_memory.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert cpu_memory.keep_freed_memory() is False
