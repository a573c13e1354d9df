"""Timing and peak-memory helpers shared by the benchmark scripts in this folder.

Peak memory is the high-water mark of bytes allocated through PyTorch's CPU allocator during
one call, above what was allocated before it. It is read from the allocation and free events
that ``torch.profiler`` records with ``profile_memory=True``: inputs and weights allocated
before the call are not counted; outputs, saved activations, gradients and temporaries are.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile


def peak_bytes(fn: Callable[[], object]) -> int:
    """Allocator high-water mark of one call of ``fn`` above the allocation before it."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def median_seconds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each callable; runs are interleaved so load drifts hit all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
