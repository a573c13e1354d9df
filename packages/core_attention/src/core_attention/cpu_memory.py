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
heap and at most 64 MiB of freed heap stays with the process for the next call. It is a
process-wide setting (``mallopt``); it does nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import threading

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD

_lock = threading.Lock()
_done: bool | None = None


def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks below 32 MiB in the heap for reuse (see the module
    docstring). Returns whether the setting is in force; called again, it does nothing."""
    global _done
    with _lock:
        if _done is None:
            _done = False
            if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _done = bool(
                    libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                    and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
                )
        return _done
