"""Real-time factor of MambAttention enhancement on CPU, and the selective-scan backends.

    python apps/speech/bench/bench_enhance.py --seconds 10 --threads 2

RTF = processing time / audio duration (below 1: faster than real time), once per scan
backend in ``--backends``. The scan part times every backend of
:data:`~attn_speech.enhance.selective_scan.BACKENDS` on the shapes of the paper
configuration's time-axis Mamba for one chunk (best of ``--repeats``, interleaved, so that
the ratios hold on a loaded machine).
"""

from __future__ import annotations

import argparse
import time

import torch

from attn_speech.enhance.inference import enhance_waveform
from attn_speech.enhance.model import MambAttention
from attn_speech.enhance.selective_scan import BACKENDS, selective_scan


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0, help="audio length (default: 10)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--chunk-seconds", type=float, default=4.0, help="chunk length (default: 4)")
    p.add_argument("--backends", default="fused", help="comma-separated scan backends for the RTF")
    p.add_argument("--repeats", type=int, default=2, help="scan timings (default: 2)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MambAttention().eval()
    wav = torch.randn(int(args.seconds * model.sample_rate)) * 0.1
    print(f"torch {torch.__version__}, {args.threads} threads, {args.seconds:.1f} s of audio")

    for backend in args.backends.split(","):
        for m in model.modules():
            if hasattr(m, "scan_backend"):
                m.scan_backend = backend
        t = _timed(lambda: enhance_waveform(model, wav, chunk_seconds=args.chunk_seconds))
        print(f"enhance ({backend:10s} scan): {t:7.2f} s  RTF {t / args.seconds:.2f}")

    frames = int(args.chunk_seconds * model.sample_rate) // model.stft.hop + 1
    d_inner, n = 4 * 64, 16
    seqs = (model.stft.bins - 1) // 2
    g = torch.Generator().manual_seed(0)
    u = torch.randn(seqs, d_inner, frames, generator=g)
    delta = torch.rand(seqs, d_inner, frames, generator=g) * 0.1
    A = -torch.rand(d_inner, n, generator=g)
    B = torch.randn(seqs, n, frames, generator=g)
    C = torch.randn(seqs, n, frames, generator=g)
    times = dict.fromkeys(BACKENDS, float("inf"))
    with torch.no_grad():
        for _ in range(args.repeats):
            for b in BACKENDS:
                t = _timed(lambda b=b: selective_scan(u, delta, A, B, C, backend=b))
                times[b] = min(times[b], t)
    print(f"scan [{seqs}, {d_inner}, {frames}] x N={n}, best of {args.repeats}:")
    for b, t in times.items():
        print(f"  {b:10s} {t:7.3f} s  ({times['sequential'] / t:.2f}x sequential)")


if __name__ == "__main__":
    main()
