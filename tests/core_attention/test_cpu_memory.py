"""keep_freed_memory sets glibc's two thresholds once, and nothing elsewhere (its effect on a
network's page faults: tests/speech/test_ecapa_inference_memory.py)."""

from __future__ import annotations

from core_attention import cpu_memory


class _FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1


def test_sets_glibcs_parameters_once(monkeypatch):
    libc = _FakeLibc()
    monkeypatch.setattr(cpu_memory, "_done", None)
    monkeypatch.setattr(cpu_memory.platform, "system", lambda: "Linux")
    monkeypatch.setattr(cpu_memory.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(cpu_memory.ctypes, "CDLL", lambda name: libc)
    assert cpu_memory.keep_freed_memory() and cpu_memory.keep_freed_memory()
    assert libc.calls == [(-3, 32 << 20), (-1, 64 << 20)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD


def test_does_nothing_without_glibc(monkeypatch):
    monkeypatch.setattr(cpu_memory, "_done", None)
    monkeypatch.setattr(cpu_memory.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert cpu_memory.keep_freed_memory() is False
