"""CPU time and peak memory of HaloAttention against timm's HaloAttn (same weights).

Two HaloNet shapes: an early stage (64 channels, 64x64 map, block 8, halo 3, as
``halonet_h1``) and a late one (256 channels, 16x16 map, block 8, halo 2, as ``halonet26t``
stage 3), each at stride 1 and stride 2, forward (no grad) and forward+backward.

Peak memory: see ``_measure.py`` (allocator high-water mark from ``torch.profiler`` memory
events). Time: median wall time of interleaved runs.

    python packages/core_attention/bench/bench_halo.py
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # silence the profiler's CUDA probe on CPU hosts

import torch
from _measure import median_seconds, peak_bytes
from timm.layers.halo_attn import HaloAttn

from core_attention.layers.halo import HaloAttention

SHAPES = (
    # name, channels, map side, block, halo
    ("64ch 64x64 b8 h3", 64, 64, 8, 3),
    ("256ch 16x16 b8 h2", 256, 16, 8, 2),
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    parser.add_argument("--heads", type=int, default=8, help="attention heads (default 8)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs, median (default 5)")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (default: torch's choice)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print(
        f"HaloAttention vs timm HaloAttn, CPU, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}: batch {args.batch}, {args.heads} heads, fp32\n"
    )
    print(
        "| shape | stride | pass | timm time (ms) | ours time (ms) | time ratio "
        "| timm peak (MiB) | ours peak (MiB) | memory ratio |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for label, dim, side, block, halo in SHAPES:
        for stride in (1, 2):
            cfg = {
                "dim": dim,
                "num_heads": args.heads,
                "block_size": block,
                "halo_size": halo,
                "stride": stride,
            }
            ours, theirs = HaloAttention(**cfg), HaloAttn(**cfg)
            theirs.load_state_dict(ours.state_dict(), strict=True)
            x = torch.randn(args.batch, dim, side, side)
            with torch.no_grad():
                err = (ours(x) - theirs(x)).abs().max().item()
            if err > 1e-4:
                raise RuntimeError(f"outputs differ by {err} for {label}, stride {stride}")
            xg = x.clone().requires_grad_(True)

            def inference(mod, x=x):
                with torch.no_grad():
                    return mod(x)

            def training(mod, xg=xg):
                mod(xg).sum().backward()
                xg.grad = None
                mod.zero_grad(set_to_none=True)

            for name, run in (("forward", inference), ("fwd+bwd", training)):
                fns = {
                    "timm": lambda run=run, m=theirs: run(m),
                    "ours": lambda run=run, m=ours: run(m),
                }
                t = median_seconds(fns, args.repeats)
                m = {k: peak_bytes(fn) for k, fn in fns.items()}
                print(
                    f"| {label} | {stride} | {name} | {t['timm'] * 1e3:.1f} | "
                    f"{t['ours'] * 1e3:.1f} | {t['ours'] / t['timm']:.2f} | "
                    f"{m['timm'] / 2**20:.1f} | {m['ours'] / 2**20:.1f} | "
                    f"{m['ours'] / m['timm']:.2f} |"
                )
    print("\nratio = ours / timm (below 1: ours is faster or smaller)")


if __name__ == "__main__":
    main()
