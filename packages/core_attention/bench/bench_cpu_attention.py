"""CPU inference time of core_attention's small-head kernel against PyTorch's
``scaled_dot_product_attention`` on the same inputs.

Shapes are MambAttention's (Kühne et al. 2025; 64 channels, 8 heads of 8) time and
frequency passes over one 4 s chunk, and the same width in 4 heads of 16. Inputs are views
of one ``[B, N, 3, H, D]`` projection output, as an attention layer produces them, and each
result is merged back to ``[B, N, H * D]`` (free for the kernel's output layout, a copy for
SDPA's). Median wall time of interleaved runs.

    python packages/core_attention/bench/bench_cpu_attention.py --threads 2
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _measure import median_seconds

from core_attention import cpu_attention

SHAPES = (
    # name, sequences, tokens, heads, head size
    ("time pass, 8 heads of 8", 100, 641, 8, 8),
    ("frequency pass, 8 heads of 8", 641, 100, 8, 8),
    ("time pass, 4 heads of 16", 100, 641, 4, 16),
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs, median (default 5)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not cpu_attention.available():
        raise SystemExit(f"the kernel did not build: {cpu_attention.build_error()}")
    print(
        f"small-head attention vs SDPA, CPU, {args.threads} threads, torch {torch.__version__}, "
        "fp32, no grad\n"
    )
    print("| shape | [B, N, H, D] | SDPA (ms) | kernel (ms) | speed-up | max abs diff |")
    print("|---|---|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    for label, b, n, h, d in SHAPES:
        x = torch.randn(b, n, 3, h, d, generator=gen)
        q, k, v = (t.transpose(1, 2) for t in x.unbind(2))
        scale = d**-0.5

        def sdpa(q=q, k=k, v=v, b=b, n=n, scale=scale):
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
            return out.transpose(1, 2).reshape(b, n, -1)

        def kernel(q=q, k=k, v=v, b=b, n=n, scale=scale):
            out = cpu_attention.small_head_attention(q, k, v, scale)
            return out.transpose(1, 2).reshape(b, n, -1)

        with torch.no_grad():
            diff = (sdpa() - kernel()).abs().max().item()
            t = median_seconds({"sdpa": sdpa, "kernel": kernel}, args.repeats)
        print(
            f"| {label} | [{b}, {n}, {h}, {d}] | {t['sdpa'] * 1e3:.1f} | "
            f"{t['kernel'] * 1e3:.1f} | {t['sdpa'] / t['kernel']:.2f}x | {diff:.1e} |"
        )


if __name__ == "__main__":
    main()
