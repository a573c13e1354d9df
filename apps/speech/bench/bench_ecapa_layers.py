"""CPU speed of FastEcapa's convolutions: the compiled kernel (attn_speech.ecapa.conv_kernel)
against oneDNN's convolution / inner product with packed weights, per layer shape, and the
Res2Net part of one block (attn_speech.ecapa.res2net_kernel) against the path taken without
a compiler (oneDNN's convolutions, PyTorch's element-wise operations).

The aggregation layer is timed twice: as one product, and with the one Strassen level
(attn_speech.ecapa.strassen_kernel) FastEcapa runs it with (GMAC/s counts the plain
product's multiply-adds). Each call runs after a pass over 64 MiB of other data, as in the
network, whose 70 MiB of weights (C=1024) come from memory on every call; the two paths
alternate; the table gives each one's median and the GMAC/s it means.

    python apps/speech/bench/bench_ecapa_layers.py [--channels 1024] [--frames 500]
        [--threads 2] [--repeats 50]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from attn_speech.ecapa import time_conv
from attn_speech.ecapa.config import EcapaConfig
from attn_speech.ecapa.fast import FastEcapa
from attn_speech.ecapa.model import EcapaTDNN
from attn_speech.ecapa.time_conv import TimeConv
from core_attention.cpu_memory import keep_freed_memory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--channels", type=int, default=1024, help="C (default: 1024)")
    p.add_argument("--frames", type=int, default=500, help="T, frames (default: 500, 5 s)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--repeats", type=int, default=50, help="timed calls per path (default: 50)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as Embedder does
    c, t = args.channels, args.frames
    junk = torch.zeros(16 << 20)

    def median_ms(fn) -> float:
        times = []
        for _ in range(args.repeats):
            junk.add_(1.0)  # evict the caches
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    torch.manual_seed(0)
    width = c // 8
    layers = {  # name: (C_in, C_out, taps, dilation)
        "first TDNN (80 -> C, 5 taps)": (80, c, 5, 1),
        "block TDNN (C -> C, 1x1)": (c, c, 1, 1),
        "Res2Net group (C/8 -> C/8, 3 taps, dilation 2)": (width, width, 3, 2),
        "aggregation (3C -> 3C, 1x1)": (3 * c, 3 * c, 1, 1),
        "aggregation, one Strassen level (7/8 of the products)": (3 * c, 3 * c, 1, 1),
        "pooling's hidden layer (3C -> 128, 1x1)": (3 * c, 128, 1, 1),
    }
    rows = []
    with torch.inference_mode():
        for name, (cin, cout, taps, dil) in layers.items():
            weight = torch.randn(cout, cin, taps) / (cin * taps) ** 0.5
            conv = TimeConv(weight, torch.randn(cout), dil)
            conv.strassen = "Strassen" in name  # as FastEcapa sets it for this layer
            x = torch.randn(1, t + 2 * conv.pad, cin)
            macs = t * cin * cout * taps
            timing = {}
            for native in (True, False, True, False):
                time_conv.NATIVE = native
                conv(x)  # packs the weights
                timing.setdefault(native, []).append(median_ms(lambda conv=conv, x=x: conv(x)))
            time_conv.NATIVE = True
            native_ms, onednn_ms = min(timing[True]), min(timing[False])
            rows.append(
                (name, native_ms, macs / native_ms / 1e6, onednn_ms, macs / onednn_ms / 1e6)
            )

        cfg = EcapaConfig(channels=(c, c, c, c, 3 * c))
        block = FastEcapa(EcapaTDNN(cfg).eval()).blocks[1]
        u = torch.randn(1, t, c)
        pad = block.groups[0].pad
        macs = 7 * t * width * width * 3
        fused, pytorch = [], []
        for _ in range(2):
            fused.append(median_ms(lambda: block._res2net_compiled(u, None)))
            time_conv.NATIVE = False  # the path without a compiler: oneDNN and PyTorch
            buf = u.new_empty(1, t + 2 * pad, width)
            pytorch.append(median_ms(lambda buf=buf: block._res2net(u, buf, None)))
            time_conv.NATIVE = True
        f, q = min(fused), min(pytorch)
        rows.append(("Res2Net part of a block (7 groups)", f, macs / f / 1e6, q, macs / q / 1e6))

    print(
        f"ECAPA-TDNN C={c} layers at T={t} frames, {args.threads} threads, float32, "
        f"median of {args.repeats} cold calls (best of two rounds)"
    )
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}\n")
    print("| layer | compiled kernel | GMAC/s | oneDNN (+ PyTorch) | GMAC/s | speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, ours, ours_rate, other, other_rate in rows:
        print(
            f"| {name} | {ours:.3f} ms | {ours_rate:.0f} | {other:.3f} ms | {other_rate:.0f} "
            f"| {other / ours:.2f}x |"
        )


if __name__ == "__main__":
    main()
