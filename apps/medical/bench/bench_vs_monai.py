"""Attention residual U-Net vs MONAI's ``AttentionUnet`` on the synthetic wound set.

Both networks get the same channels and strides, the same data, patches, augmentation
and order, the same loss (Dice + CE), optimizer and schedule, and the same number of
steps; then, in the same run:

* validation Dice on the held-out images (whole-image inference);
* training time per step;
* Gaussian sliding-window inference throughput (MONAI's ``sliding_window_inference``)
  on large photographs, in megapixels per second.

    python apps/medical/bench/bench_vs_monai.py [--steps 300] [--size 64] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def build_models(channels, strides):
    from monai.networks.nets import AttentionUnet

    from attn_medical.models import AttentionResUNet

    ours = AttentionResUNet(
        spatial_dims=2,
        in_channels=3,
        out_channels=2,
        channels=tuple(channels),
        strides=tuple(strides),
        norm="batch",
        deep_supervision=True,
    )
    monai = AttentionUnet(
        spatial_dims=2, in_channels=3, out_channels=2, channels=channels, strides=strides
    )
    return {"attn-medical AttentionResUNet": ours, "MONAI AttentionUnet": monai}


def train(model, dataset, steps, batch_size, lr, seed, device):
    from attn_medical.losses import SegmentationLoss

    torch.manual_seed(seed)
    model.to(device).train()
    loss_fn = SegmentationLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    order = np.random.default_rng(seed).permutation(len(dataset))
    start = time.perf_counter()
    for step in range(steps):
        idx = [order[(step * batch_size + j) % len(order)] for j in range(batch_size)]
        # PatchDataset seeds its augmentation from NumPy's global generator: same patches
        # and augmentation for every model.
        np.random.seed(seed + step)  # noqa: NPY002
        samples = [dataset[i] for i in idx]
        image = torch.stack([s["image"] for s in samples]).to(device)
        label = torch.stack([s["label"] for s in samples]).to(device)
        loss = loss_fn(model(image), label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    if device != "cpu":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


@torch.no_grad()
def sliding_window_throughput(model, size, patch, repeats, device):
    from monai.inferers import sliding_window_inference

    model.to(device).eval()
    x = torch.rand(1, 3, size, size, device=device)

    def once():
        return sliding_window_inference(x, patch, 8, model, overlap=0.5, mode="gaussian")

    once()  # warm-up
    times = []
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        once()
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return size * size / 1e6 / float(np.median(times))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="training steps per model (default: 300)")
    p.add_argument("--size", type=int, default=64, help="wound image side (default: 64)")
    p.add_argument("--count", type=int, default=200, help="wound images (default: 200)")
    p.add_argument("--batch-size", type=int, default=8, help="(default: 8)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: 3e-3)")
    p.add_argument(
        "--channels", type=int, nargs="+", default=[16, 32, 64, 128], help="(default: 16 32 64 128)"
    )
    p.add_argument(
        "--sw-size", type=int, default=512, help="sliding-window image side (default: 512)"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed sliding-window runs (default: 3)")
    p.add_argument("--device", default="cpu", help="(default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    args = p.parse_args(argv)

    from attn_medical.datasets import discover, kfold_splits, load_cases
    from attn_medical.synthetic import write_wounds
    from attn_medical.training import PatchDataset, build_preprocessing, prepare_cases, validate
    from attn_medical.transforms import train_transform

    patch = [args.size, args.size]
    strides = [2] * (len(args.channels) - 1)
    with tempfile.TemporaryDirectory() as tmp:
        write_wounds(Path(tmp) / "w", args.count, (args.size, args.size), seed=args.seed)
        spec = discover(Path(tmp) / "w")
        cases, _ = load_cases(spec, spec.cases)
    split = kfold_splits([c.name for c in cases], 5, seed=args.seed)[0]
    train_cases = [c for c in cases if c.name in split["train"]]
    val_cases = [c for c in cases if c.name in split["val"]]
    prep = build_preprocessing(spec, train_cases, patch)
    dataset = PatchDataset(
        prepare_cases(train_cases, prep), train_transform(patch, 2), length=len(train_cases)
    )
    val = prepare_cases(val_cases, prep)

    rows = []
    torch.manual_seed(args.seed)
    for name, model in build_models(args.channels, strides).items():
        params = sum(p.numel() for p in model.parameters())
        step_s = train(model, dataset, args.steps, args.batch_size, args.lr, args.seed, args.device)
        dice = validate(model, val, patch, 2, device=args.device)["dice"]
        mpx = sliding_window_throughput(model, args.sw_size, patch, args.repeats, args.device)
        rows.append((name, params, dice, step_s, mpx))

    print(
        f"# {args.count} synthetic wounds {args.size}x{args.size} ({len(train_cases)} train / "
        f"{len(val_cases)} val), channels {args.channels}, strides {strides}, "
        f"{args.steps} steps x batch {args.batch_size}, AdamW one-cycle lr {args.lr}, Dice+CE"
    )
    device = torch.cuda.get_device_name() if args.device != "cpu" else platform.processor() or "cpu"
    print(
        f"# device {args.device} ({device}, {torch.get_num_threads()} threads), torch "
        f"{torch.__version__}; sliding window {args.sw_size}x{args.sw_size}, patch {patch}, "
        "overlap 0.5, gaussian, 8 windows per batch"
    )
    print("| model | parameters | val Dice | s / train step | sliding window Mpx/s |")
    print("|---|---|---|---|---|")
    for name, params, dice, step_s, mpx in rows:
        print(f"| {name} | {params / 1e6:.2f} M | {dice:.4f} | {step_s:.3f} | {mpx:.2f} |")
    ours, ref = rows[0], rows[1]
    print(
        f"ratio (ours / MONAI): Dice {ours[2] / ref[2]:.3f}, step time {ours[3] / ref[3]:.2f}, "
        f"throughput {ours[4] / ref[4]:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
