"""Benchmark: FlashAttention-2 Triton kernel vs torch SDPA backends and FlexAttention (GPU).

Forward, backward and forward+backward throughput in TFLOP/s, bf16, for sequence lengths
512 to 16k, head dims 64 and 128, causal and not. FLOPs follow the FlashAttention-2 paper
(Dao 2023): forward ``4 * B * H * N * N * D``, backward 2.5x the forward, halved when causal.
Each shape keeps ``B * N`` = ``--tokens`` and ``H * D`` = ``--hidden`` (16k tokens and 2048
by default, as in the paper). Every time is the median of ``triton.testing.do_bench``.

Providers: ``triton`` (this package, through ``flash_attn_func``), ``flash``, ``cudnn`` and
``efficient`` (``scaled_dot_product_attention`` restricted to one ``SDPBackend``) and ``flex``
(``torch.compile``-d FlexAttention). A provider that cannot run a shape shows ``n/a``.

Prints the GPU name and torch/Triton versions and writes a markdown table to
``kernels/results/<date>-<gpu>.md`` (``--out-dir`` to change). Without CUDA it says so and
exits 0.

    python kernels/bench/bench_attention.py                   # full sweep
    python kernels/bench/bench_attention.py --seqlens 8192 --head-dims 128 --causal false
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import re
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

PROVIDERS = ("triton", "flash", "cudnn", "efficient", "flex")
SDPA_PROVIDERS = ("flash", "cudnn", "efficient")
MODES = ("fwd", "bwd", "fwd+bwd")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384", help="sequence lengths")
    p.add_argument("--head-dims", default="64,128", help="head dims")
    p.add_argument(
        "--causal", default="both", choices=("both", "true", "false"), help="causal masking"
    )
    p.add_argument(
        "--providers", default=",".join(PROVIDERS), help="subset of " + ",".join(PROVIDERS)
    )
    p.add_argument("--modes", default=",".join(MODES), help="subset of " + ",".join(MODES))
    p.add_argument("--tokens", type=int, default=16384, help="batch * seqlen per shape")
    p.add_argument("--hidden", type=int, default=2048, help="heads * head_dim per shape")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, milliseconds")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, milliseconds")
    p.add_argument(
        "--out-dir",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "results",
        help="folder for the markdown table",
    )
    return p.parse_args(argv)


def attention_flops(b, h, n, d, causal, mode):
    fwd = 4.0 * b * h * n * n * d
    if causal:
        fwd /= 2
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


_FLEX = []


def _compiled_flex():
    """One compiled FlexAttention for the whole sweep (each shape is one recompile)."""
    if not _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 1024)
        _FLEX.append(torch.compile(flex_attention, dynamic=False))
    return _FLEX[0]


def make_provider(name, causal, n):
    """A function ``(q, k, v) -> out`` for one provider, or raise if it is unavailable."""
    if name == "triton":
        from attention_kernels.flash_attention import flash_attn_func

        return lambda q, k, v: flash_attn_func(q, k, v, causal=causal)
    if name in SDPA_PROVIDERS:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {
            "flash": SDPBackend.FLASH_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
        }[name]

        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return run
    if name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        compiled = _compiled_flex()
        block_mask = None
        if causal:

            def causal_mask(b, h, q_idx, kv_idx):
                return q_idx >= kv_idx

            block_mask = create_block_mask(causal_mask, None, None, n, n, device="cuda")
        return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)
    raise ValueError(f"unknown provider {name!r}")


def time_ms(fn, q, k, v, mode, warmup, rep):
    import triton.testing

    if mode == "fwd":
        with torch.no_grad():
            return triton.testing.do_bench(
                lambda: fn(q, k, v), warmup=warmup, rep=rep, return_mode="median"
            )
    out = fn(q, k, v)
    dout = torch.randn_like(out)
    if mode == "bwd":
        return triton.testing.do_bench(
            lambda: out.backward(dout, retain_graph=True),
            warmup=warmup,
            rep=rep,
            grad_to_none=[q, k, v],
            return_mode="median",
        )
    return triton.testing.do_bench(
        lambda: fn(q, k, v).backward(dout),
        warmup=warmup,
        rep=rep,
        grad_to_none=[q, k, v],
        return_mode="median",
    )


def gpu_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA GPU (none found); nothing measured.")
        return 0
    import triton

    seqlens = [int(s) for s in args.seqlens.split(",")]
    head_dims = [int(s) for s in args.head_dims.split(",")]
    causals = {"both": [False, True], "true": [True], "false": [False]}[args.causal]
    providers = [p for p in args.providers.split(",") if p]
    modes = [m for m in args.modes.split(",") if m]
    for p in providers:
        if p not in PROVIDERS:
            raise SystemExit(f"unknown provider {p!r}; choose from {PROVIDERS}")
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}; choose from {MODES}")

    gpu = torch.cuda.get_device_name()
    header = [
        f"GPU: {gpu} (compute capability {'.'.join(map(str, torch.cuda.get_device_capability()))})",
        f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}",
        f"date: {dt.date.today().isoformat()}; bf16; B*N = {args.tokens}, H*D = {args.hidden}; "
        f"median of triton.testing.do_bench (warmup {args.warmup} ms, rep {args.rep} ms)",
    ]
    for line in header:
        print(line)

    rows = []
    ratios = {m: [] for m in modes}
    for causal in causals:
        for d in head_dims:
            for n in seqlens:
                b = max(1, args.tokens // n)
                h = max(1, args.hidden // d)
                torch.manual_seed(0)
                q, k, v = (
                    torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                    for _ in range(3)
                )
                fns, reference = {}, None
                for p in providers:
                    try:
                        fns[p] = make_provider(p, causal, n)
                        with torch.no_grad():
                            out = fns[p](q, k, v).float()
                    except Exception as exc:  # a backend that does not support the case
                        print(f"  {p} n={n} d={d}: n/a ({type(exc).__name__}: {exc})"[:200])
                        fns[p] = None
                        continue
                    if reference is None:
                        reference, reference_name = out, p
                    else:
                        err = float((out - reference).norm() / reference.norm())
                        if err > 1e-2:
                            print(f"  warning: {p} differs from {reference_name} by {err:.2e}")
                    del out
                for mode in modes:
                    tflops = {}
                    for p in providers:
                        if fns[p] is None:
                            tflops[p] = None
                            continue
                        try:
                            ms = time_ms(fns[p], q, k, v, mode, args.warmup, args.rep)
                            tflops[p] = attention_flops(b, h, n, d, causal, mode) / ms * 1e-9
                        except Exception as exc:
                            print(
                                f"  {p} {mode} n={n} d={d}: n/a ({type(exc).__name__}: {exc})"[:200]
                            )
                            tflops[p] = None
                        finally:
                            q.grad = k.grad = v.grad = None
                    best_sdpa = max(
                        (tflops[p] for p in SDPA_PROVIDERS if tflops.get(p)), default=None
                    )
                    ratio = None
                    if tflops.get("triton") and best_sdpa:
                        ratio = tflops["triton"] / best_sdpa
                        ratios[mode].append(ratio)
                    row = (mode, causal, d, n, b, h, tflops, ratio)
                    rows.append(row)
                    cells = " ".join(
                        f"{p}={tflops[p]:.0f}" if tflops[p] else f"{p}=n/a" for p in providers
                    )
                    ratio_s = f"{ratio:.2f}" if ratio else "n/a"
                    print(
                        f"{mode:8s} causal={causal!s:5s} d={d:3d} n={n:5d}: {cells} TFLOP/s;"
                        f" triton/best SDPA {ratio_s}",
                        flush=True,
                    )
                del q, k, v
                torch.cuda.empty_cache()

    lines = ["# Dense attention benchmark", "", *[f"- {line}" for line in header], ""]
    lines.append(
        "| mode | causal | D | N | B | H | " + " | ".join(providers) + " | triton / best SDPA |"
    )
    lines.append("|" + "---|" * (7 + len(providers)))
    for mode, causal, d, n, b, h, tflops, ratio in rows:
        cells = " | ".join(f"{tflops[p]:.1f}" if tflops[p] else "n/a" for p in providers)
        ratio_s = f"{ratio:.2f}" if ratio else "n/a"
        lines.append(f"| {mode} | {causal} | {d} | {n} | {b} | {h} | {cells} | {ratio_s} |")
    lines.append("")
    lines.append("TFLOP/s (higher is better). Geometric mean of triton / best SDPA backend:")
    for mode in modes:
        if ratios[mode]:
            gm = math.exp(statistics.fmean(math.log(r) for r in ratios[mode]))
            lines.append(f"- {mode}: {gm:.2f} over {len(ratios[mode])} shapes")
            print(f"geomean triton/best SDPA {mode}: {gm:.2f}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"{dt.date.today().isoformat()}-{gpu_slug(gpu)}.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
