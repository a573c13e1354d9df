"""CPU throughput and peak memory of attn_vision's models against their references.

* ``biformer_tiny`` with core_attention's ``BiLevelRoutingAttention`` against the same
  network whose routing layers are replaced by ``GatherBRA`` below, a re-implementation of
  the official ``ops/bra_legacy.py`` forward (``torch.gather`` of the routed key/value
  regions into a ``[n, p^2, topk, w^2, c]`` copy, one softmax), with the same weights.
* ``halonet26t`` with core_attention's ``HaloAttention`` against timm's own ``HaloAttn``,
  with the same weights.

Both pairs are checked to give the same logits before timing. For each of ``forward``
(inference, no grad) and ``train step`` (forward, backward, AdamW step) the script reports
images/s (median of ``--repeats`` timed runs after a warm-up) and the peak memory: the
high-water mark of bytes allocated through PyTorch's CPU allocator during one call, above
what was allocated before it (weights, optimizer state from the warm-up and inputs are not
counted; activations, saved tensors and gradients are), read from ``torch.profiler``'s
memory events.

    python apps/vision/bench/bench_vision.py [--batch 8] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import timm
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import attn_vision  # noqa: F401  (registers the models)
from attn_vision.models.halonet import use_core_halo_attention
from core_attention.layers.bilevel_routing import BiLevelRoutingAttention


class GatherBRA(nn.Module):
    """Official-style BRA forward (identity key/value, hard routing, sizes divisible by
    ``n_win``) reading the weights of a ``BiLevelRoutingAttention``."""

    def __init__(self, ours: BiLevelRoutingAttention):
        super().__init__()
        self.n_win, self.num_heads, self.topk = ours.n_win, ours.num_heads, ours.topk
        self.qk_dim, self.scale = ours.qk_dim, ours.scale
        self.qkv, self.wo, self.lepe = ours.qkv, ours.wo, ours.lepe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, H, W, C = x.shape
        nw, qk, m = self.n_win, self.qk_dim, self.num_heads
        h, w, p2 = H // nw, W // nw, nw * nw
        x = x.reshape(n, nw, h, nw, w, C).permute(0, 1, 3, 2, 4, 5).reshape(n, p2, h, w, C)
        q, kv = self.qkv.qkv(x).split([qk, qk + C], dim=-1)
        q_pix = q.reshape(n, p2, h * w, qk)
        kv_pix = kv.reshape(n, p2, h * w, qk + C)
        q_win, k_win = q.mean([2, 3]), kv[..., :qk].mean([2, 3])
        v_img = kv[..., qk:].reshape(n, nw, nw, h, w, C).permute(0, 5, 1, 3, 2, 4)
        lepe = self.lepe(v_img.reshape(n, C, H, W).contiguous()).permute(0, 2, 3, 1)
        logits = (q_win.detach() * self.scale) @ k_win.detach().transpose(-2, -1)
        _, r_idx = torch.topk(logits, k=self.topk, dim=-1)
        w2, ckv = h * w, qk + C
        sel = torch.gather(
            kv_pix.view(n, 1, p2, w2, ckv).expand(-1, p2, -1, -1, -1),
            dim=2,
            index=r_idx.view(n, p2, self.topk, 1, 1).expand(-1, -1, -1, w2, ckv),
        )
        k_sel, v_sel = sel.split([qk, C], dim=-1)
        k_sel = k_sel.reshape(n * p2, self.topk * w2, m, -1).permute(0, 2, 3, 1)
        v_sel = v_sel.reshape(n * p2, self.topk * w2, m, -1).transpose(1, 2)
        q_pix = q_pix.reshape(n * p2, w2, m, -1).transpose(1, 2)
        attn = ((q_pix * self.scale) @ k_sel).softmax(-1)
        out = (attn @ v_sel).reshape(n, nw, nw, m, h, w, -1).permute(0, 1, 4, 2, 5, 3, 6)
        return self.wo(out.reshape(n, H, W, C) + lepe)


def with_gather_attention(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose routing layers run :class:`GatherBRA` (shared weights)."""
    model = copy.deepcopy(model)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, BiLevelRoutingAttention):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, GatherBRA(mod))
    return model


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


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (also creates the optimizer state)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tasks(model: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def forward():
        model.eval()
        with torch.no_grad():
            return model(x)

    def train_step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        model(x).logsumexp(-1).mean().backward()
        optimizer.step()

    return {"forward": forward, "train step": train_step}


def compare(title: str, ours: nn.Module, reference: nn.Module, x: torch.Tensor, repeats: int):
    with torch.no_grad():
        err = (ours.eval()(x) - reference.eval()(x)).abs().max().item()
    if err > 1e-3:
        raise RuntimeError(f"{title}: logits differ by {err}")
    b = x.shape[0]
    print(f"\n{title}, input {list(x.shape)}, max |logit difference| {err:.1e}\n")
    print(
        "| pass | reference img/s | ours img/s | speed-up | reference peak (MiB) "
        "| ours peak (MiB) | memory ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    ref_tasks, our_tasks = tasks(reference, x), tasks(ours, x)
    for name in ref_tasks:
        t_ref = median_seconds(ref_tasks[name], repeats)
        t_our = median_seconds(our_tasks[name], repeats)
        m_ref, m_our = peak_bytes(ref_tasks[name]), peak_bytes(our_tasks[name])
        print(
            f"| {name} | {b / t_ref:.2f} | {b / t_our:.2f} | {t_ref / t_our:.2f}x | "
            f"{m_ref / 2**20:.0f} | {m_our / 2**20:.0f} | {m_our / m_ref:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--only", choices=("biformer", "halonet"), default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} CPU "
        f"threads, fp32, batch {args.batch}, median of {args.repeats}"
    )
    if args.only in (None, "biformer"):
        ours = timm.create_model("biformer_tiny")
        compare(
            "biformer_tiny: core_attention BRA (ours) vs official-style gather BRA (reference)",
            ours,
            with_gather_attention(ours),
            torch.randn(args.batch, 3, 224, 224),
            args.repeats,
        )
    if args.only in (None, "halonet"):
        reference = timm.create_model("halonet26t")
        ours = copy.deepcopy(reference)
        use_core_halo_attention(ours)
        compare(
            "halonet26t: core_attention HaloAttention (ours) vs timm HaloAttn (reference)",
            ours,
            reference,
            torch.randn(args.batch, 3, 256, 256),
            args.repeats,
        )
    print("\nspeed-up = reference time / ours; memory ratio = ours / reference peak")


if __name__ == "__main__":
    main()
