"""Keeping freed CPU memory in the process, for inference loops on the CPU.

glibc's ``malloc`` serves a block above its *mmap threshold* with a fresh ``mmap`` and
returns the top of its heap to the operating system once more than the *trim threshold*
(twice the former) is free there. Both start low (128 KiB) and only rise when a large
mapped block happens to be freed. A network whose activations are a few MiB each (ECAPA-TDNN
at C=1024: 2-6 MiB per 5 s of audio) then gets fresh pages from the kernel on every call:
some 4,500 page faults per 5 s file, several milliseconds of kernel time, which is 7-12 % of
the call on two cores.

:func:`keep_freed_memory` sets both thresholds to glibc's own ceiling for the dynamic
threshold (32 MiB for mapping, 64 MiB for trimming), so blocks below 32 MiB come from the
heap and at most 64 MiB of freed heap stays with the process for the next call. With
``large_blocks=True`` it also serves larger blocks from the heap (glibc maps every block
above 32 MiB otherwise) and keeps up to 4 GiB of freed heap: for networks whose activations
are larger (MambAttention on 4 s chunks: over a million page faults per 10 s of audio), at
the price of the process holding on to its peak memory. These are process-wide settings
(``mallopt``), meant for the processes that run the networks (the command-line tools); they
do nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import threading

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
MMAP_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD
LARGE_TRIM_THRESHOLD = 4 << 30

_lock = threading.Lock()
_level = -1  # -1: not tried; 0: not glibc (or refused); 1: blocks < 32 MiB; 2: all blocks


def keep_freed_memory(large_blocks: bool = False) -> bool:
    """Have glibc keep freed heap blocks for reuse (see the module docstring): those below
    32 MiB, or with ``large_blocks`` all of them. Returns whether the setting is in force;
    a second call never weakens an earlier one."""
    global _level
    want = 2 if large_blocks else 1
    with _lock:
        if _level == 0 or _level >= want:
            return _level >= want
        if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
            _level = 0
            return False
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        settings = [(_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD)]
        if large_blocks:
            settings = [(_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, LARGE_TRIM_THRESHOLD)]
        if all(libc.mallopt(param, value) for param, value in settings):
            _level = want
        elif _level < 0:
            _level = 0
        return _level >= want
