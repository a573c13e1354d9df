"""keep_freed_memory: freed blocks stay in the process (no page faults when the next call
allocates them again), with glibc's parameters, never weakened by a later call."""

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
mode, size = sys.argv[1], int(sys.argv[2])
if mode == "keep":
    assert keep_freed_memory() and keep_freed_memory()
if mode == "large":
    assert keep_freed_memory(large_blocks=True) and keep_freed_memory()
faults = 0
for step in range(8):  # a network call: four activations alive at once, then freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.empty(size, dtype=torch.uint8).fill_(1) for _ in range(4)]
    del blocks
    if step >= 4:  # once glibc's thresholds and the heap have settled
        faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults)
"""


def _faults(mode: str, size: int) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode, str(size)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason="a glibc setting")
def test_large_blocks_are_reused_only_when_asked():
    size = 40 << 20  # above the largest mmap threshold glibc accepts
    pages = 4 * 4 * size // 4096
    assert _faults("default", size) > pages // 2  # mapped afresh every time
    assert _faults("keep", size) > pages // 2  # blocks below 32 MiB only
    assert _faults("large", size) < pages // 50


class _FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1


def test_settings_are_glibcs_and_never_weakened(monkeypatch):
    libc = _FakeLibc()
    monkeypatch.setattr(cpu_memory, "_level", -1)
    monkeypatch.setattr(cpu_memory.platform, "system", lambda: "Linux")
    monkeypatch.setattr(cpu_memory.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(cpu_memory.ctypes, "CDLL", lambda name: libc)
    assert cpu_memory.keep_freed_memory()
    assert libc.calls == [(-3, 32 << 20), (-1, 64 << 20)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    assert cpu_memory.keep_freed_memory(large_blocks=True)
    assert libc.calls[2:] == [(-4, 0), (-1, 4 << 30)]  # M_MMAP_MAX, M_TRIM_THRESHOLD
    assert cpu_memory.keep_freed_memory() and cpu_memory.keep_freed_memory(large_blocks=True)
    assert len(libc.calls) == 4  # nothing weakens or repeats the settings


def test_does_nothing_without_glibc(monkeypatch):
    monkeypatch.setattr(cpu_memory, "_level", -1)
    monkeypatch.setattr(cpu_memory.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert cpu_memory.keep_freed_memory() is False
