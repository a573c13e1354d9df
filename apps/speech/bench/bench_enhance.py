"""Real-time factor of MambAttention enhancement on CPU, and the selective-scan backends.

    python apps/speech/bench/bench_enhance.py --seconds 10 --threads 2
    OMP_NUM_THREADS=1 python apps/speech/bench/bench_enhance.py --threads 1 --clock cpu

RTF = processing time / audio duration (below 1: faster than real time) of
:func:`~attn_speech.enhance.inference.enhance_waveform` at the paper configuration
(MambAttention, Kühne et al. 2025: 2.33M parameters, chunks of at most 4 s), once per scan
backend in ``--backends`` and repeat, the backends interleaved so that their ratios hold on a loaded
machine; ``--clock cpu`` counts the process's CPU time, which other jobs do not inflate
(meaningful at one thread). ``auto`` is the compiled kernel path of
:mod:`attn_speech.enhance.scan_kernel` where it builds; its one-off build is reported.
On a machine that other jobs load, OpenMP threads spinning at barriers make two threads
far slower than one (every parallel op waits for a descheduled thread);
``OMP_WAIT_POLICY=passive`` avoids most of that.

The scan part times every backend of :data:`~attn_speech.enhance.selective_scan.BACKENDS`
on the shapes of the time-axis Mamba (Gu & Dao 2023) of one 4 s chunk (best of
``--repeats``, interleaved).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from attn_speech.enhance import scan_kernel
from attn_speech.enhance.inference import enhance_waveform
from attn_speech.enhance.model import MambAttention
from attn_speech.enhance.selective_scan import BACKENDS, selective_scan


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0, help="audio length (default: 10)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--chunk-seconds", type=float, default=4.0, help="chunk length (default: 4)")
    p.add_argument(
        "--backends", default="auto,fused", help="comma-separated scan backends for the RTF"
    )
    p.add_argument(
        "--scan-backends", default=",".join(BACKENDS), help="backends for the scan timings"
    )
    p.add_argument("--repeats", type=int, default=2, help="passes per backend (default: 2)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    start = time.perf_counter()
    built = scan_kernel.available()
    note = f"{time.perf_counter() - start:.2f} s" if built else scan_kernel.build_error()
    print(f"torch {torch.__version__}, {args.threads} threads, {args.clock} clock")
    print(f"compiled scan kernel: {'yes' if built else 'no'} (first call {note})")

    torch.manual_seed(0)
    model = MambAttention().eval()
    wav = torch.randn(int(args.seconds * model.sample_rate)) * 0.1
    backends = args.backends.split(",")
    times: dict[str, list[float]] = {b: [] for b in backends}
    for _ in range(args.repeats):
        for backend in backends:
            for m in model.modules():
                if hasattr(m, "scan_backend"):
                    m.scan_backend = backend
            t0 = clock()
            enhance_waveform(model, wav, chunk_seconds=args.chunk_seconds)
            times[backend].append(clock() - t0)
            print(f"  {backend:10s} {times[backend][-1]:7.2f} s", flush=True)
    print(f"enhance {args.seconds:.1f} s of audio, {args.chunk_seconds:.1f} s chunks:")
    first = backends[0]
    for backend, ts in times.items():
        ratio = statistics.median(a / b for a, b in zip(ts, times[first]))
        print(
            f"  {backend:10s} best {min(ts):7.2f} s  RTF {min(ts) / args.seconds:.2f}"
            f"  (median {ratio:.2f}x {first})"
        )

    frames = int(args.chunk_seconds * model.sample_rate) // model.stft.hop + 1
    d_inner, n = 4 * 64, 16
    seqs = (model.stft.bins - 1) // 2
    g = torch.Generator().manual_seed(0)
    u = torch.randn(seqs, d_inner, frames, generator=g)
    delta = torch.rand(seqs, d_inner, frames, generator=g) * 0.1
    A = -torch.rand(d_inner, n, generator=g)
    B = torch.randn(seqs, n, frames, generator=g)
    C = torch.randn(seqs, n, frames, generator=g)
    names = [b for b in args.scan_backends.split(",") if b != "kernel" or built]
    best = dict.fromkeys(names, float("inf"))
    with torch.no_grad():
        for _ in range(args.repeats):
            for b in names:
                t0 = clock()
                selective_scan(u, delta, A, B, C, backend=b)
                best[b] = min(best[b], clock() - t0)
    print(f"scan [{seqs}, {d_inner}, {frames}] x N={n}, best of {args.repeats}:")
    for b, t in best.items():
        ref = f"  ({best['sequential'] / t:.2f}x sequential)" if "sequential" in best else ""
        print(f"  {b:10s} {t:7.3f} s{ref}")


if __name__ == "__main__":
    main()
