"""An Embedder on the CPU keeps the network's freed activation buffers in the process
(core_attention.cpu_memory.keep_freed_memory): the next call reuses them instead of taking
fresh pages from the kernel (thousands of page faults per 5 s file at C=1024 otherwise)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="a glibc setting"
)

_SCRIPT = """
import ctypes, resource, sys, torch
import core_attention.cpu_memory
if sys.argv[1] == "default":
    # glibc's starting thresholds (128 KiB), held: glibc raises them by itself once a large
    # mapped block is freed (packing large weights does), which would hide the difference
    libc = ctypes.CDLL("libc.so.6")
    assert libc.mallopt(-3, 128 << 10) and libc.mallopt(-1, 128 << 10)
    core_attention.cpu_memory._done = False  # and Embedder leaves them so
from attn_speech.ecapa.config import EcapaConfig
from attn_speech.ecapa.inference import Embedder
from attn_speech.ecapa.speaker import EcapaSpeaker
torch.set_num_threads(1)
model = EcapaSpeaker(model=EcapaConfig(channels=(1024,) * 4 + (3072,))).eval()
embedder = Embedder(model, batch_size=1)
wav = 0.1 * torch.randn(5 * 16000, generator=torch.Generator().manual_seed(0))
faults = []
for call in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    embedder.embed_waveforms([wav])
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(max(faults[3:]))
"""


def _faults_per_call(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, check=True
    ).stdout
    return int(out.split()[-1])


def test_embedder_calls_reuse_freed_memory():
    assert _faults_per_call("default") > 500  # glibc returned the buffers to the kernel
    assert _faults_per_call("keep") < 50
