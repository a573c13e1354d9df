"""CPU time and peak memory of BiLevelRoutingAttention against a gather-based implementation.

The gather-based implementation below follows BiFormer's ``ops/bra_legacy.py``: it copies the
routed key/value regions with ``torch.gather`` into an ``[n, p^2, topk, w^2, c]`` tensor and
runs one softmax over them. Both run with the same weights at BiFormer-T stage-1 size
(56x56 tokens, dim 64, 2 heads, n_win 7, LePE 5x5) for topk 1, 4 and 16.

Peak memory: see ``_measure.py`` (allocator high-water mark from ``torch.profiler`` memory
events). Time: median wall time of interleaved runs.

    python packages/core_attention/bench/bench_bilevel_routing.py
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # silence the profiler's CUDA probe on CPU hosts

import torch
from _measure import median_seconds, peak_bytes

from core_attention.layers.bilevel_routing import BiLevelRoutingAttention


def gather_bra(mod: BiLevelRoutingAttention, x: torch.Tensor) -> torch.Tensor:
    """Official-style forward (divisible sizes, identity keys, hard routing) with ``mod``'s
    weights."""
    n, H, W, C = x.shape
    nw, qk, m = mod.n_win, mod.qk_dim, mod.num_heads
    h, w, p2 = H // nw, W // nw, nw * nw
    x = x.reshape(n, nw, h, nw, w, C).permute(0, 1, 3, 2, 4, 5).reshape(n, p2, h, w, C)
    q, kv = mod.qkv.qkv(x).split([qk, qk + C], dim=-1)
    q_pix = q.reshape(n, p2, h * w, qk)
    kv_pix = kv.reshape(n, p2, h * w, qk + C)
    q_win, k_win = q.mean([2, 3]), kv[..., :qk].mean([2, 3])
    v_img = kv[..., qk:].reshape(n, nw, nw, h, w, C).permute(0, 5, 1, 3, 2, 4)
    lepe = mod.lepe(v_img.reshape(n, C, H, W).contiguous()).permute(0, 2, 3, 1)

    logits = (q_win.detach() * mod.scale) @ k_win.detach().transpose(-2, -1)
    _, r_idx = torch.topk(logits, k=mod.topk, dim=-1)
    topk, w2, ckv = mod.topk, h * w, qk + C
    sel = torch.gather(
        kv_pix.view(n, 1, p2, w2, ckv).expand(-1, p2, -1, -1, -1),
        dim=2,
        index=r_idx.view(n, p2, topk, 1, 1).expand(-1, -1, -1, w2, ckv),
    )
    k_sel, v_sel = sel.split([qk, C], dim=-1)
    k_sel = k_sel.reshape(n * p2, topk * w2, m, -1).permute(0, 2, 3, 1)
    v_sel = v_sel.reshape(n * p2, topk * w2, m, -1).transpose(1, 2)
    q_pix = q_pix.reshape(n * p2, w2, m, -1).transpose(1, 2)
    attn = ((q_pix * mod.scale) @ k_sel).softmax(-1)
    out = (attn @ v_sel).reshape(n, nw, nw, m, h, w, -1).permute(0, 1, 4, 2, 5, 3, 6)
    return mod.wo(out.reshape(n, H, W, C) + lepe)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    parser.add_argument("--size", type=int, default=56, help="feature map side (default 56)")
    parser.add_argument("--dim", type=int, default=64, help="channels (default 64)")
    parser.add_argument("--heads", type=int, default=2, help="attention heads (default 2)")
    parser.add_argument("--n-win", type=int, default=7, help="regions per side (default 7)")
    parser.add_argument(
        "--topk", type=int, nargs="+", default=[1, 4, 16], help="topk values (default 1 4 16)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs, median (default 5)")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (default: torch's choice)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print(
        f"BiLevelRoutingAttention, CPU, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}: batch {args.batch}, {args.size}x{args.size} tokens, dim "
        f"{args.dim}, {args.heads} heads, n_win {args.n_win}, fp32\n"
    )
    print(
        "| topk | pass | gather time (ms) | ours time (ms) | time ratio | gather peak (MiB) "
        "| ours peak (MiB) | memory ratio |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for topk in args.topk:
        mod = BiLevelRoutingAttention(
            args.dim, num_heads=args.heads, n_win=args.n_win, topk=topk, side_dwconv=5
        )
        x = torch.randn(args.batch, args.size, args.size, args.dim)
        with torch.no_grad():
            err = (mod(x) - gather_bra(mod, x)).abs().max().item()
        if err > 1e-4:
            raise RuntimeError(f"outputs differ by {err} at topk={topk}")
        xg = x.clone().requires_grad_(True)

        def inference(f, mod=mod, x=x):
            with torch.no_grad():
                return f(x)

        def training(f, mod=mod, xg=xg):
            f(xg).sum().backward()
            xg.grad = None
            mod.zero_grad(set_to_none=True)

        for name, run in (("forward", inference), ("fwd+bwd", training)):
            fns = {
                "gather": lambda run=run, mod=mod: run(lambda inp: gather_bra(mod, inp)),
                "ours": lambda run=run, mod=mod: run(mod),
            }
            t = median_seconds(fns, args.repeats)
            m = {k: peak_bytes(fn) for k, fn in fns.items()}
            print(
                f"| {topk} | {name} | {t['gather'] * 1e3:.1f} | {t['ours'] * 1e3:.1f} | "
                f"{t['ours'] / t['gather']:.2f} | {m['gather'] / 2**20:.1f} | "
                f"{m['ours'] / 2**20:.1f} | {m['ours'] / m['gather']:.2f} |"
            )
    print("\nratio = ours / gather (below 1: ours is faster or smaller)")


if __name__ == "__main__":
    main()
