"""CPU throughput and peak memory of attn_vision's models against their references.

* ``biformer_tiny`` with core_attention's ``BiLevelRoutingAttention`` against the same
  network whose routing layers are replaced by ``GatherBRA`` below, a re-implementation of
  the official ``ops/bra_legacy.py`` forward (``torch.gather`` of the routed key/value
  regions into a ``[n, p^2, topk, w^2, c]`` copy, one softmax), with the same weights.
  Only the routing layers differ: everything else in the two networks is the same code
  (including BiFormer's eager-inference path: channels-last maps, in-place residuals, the
  MLP over token chunks), so both gain from it alike.
* ``halonet26t`` with core_attention's ``HaloAttention`` against timm's own ``HaloAttn``,
  with the same weights.

Both pairs are checked to give the same logits before timing. For each of ``forward``
(inference, no grad) and ``train step`` (forward, backward, AdamW step) the script reports
images/s (median of ``--repeats`` interleaved timed runs after a warm-up) and the peak memory: the
high-water mark of bytes allocated through PyTorch's CPU allocator during one call, above
what was allocated before it (weights, optimizer state from the warm-up and inputs are not
counted; activations, saved tensors and gradients are), read from ``torch.profiler``'s
memory events.

    python apps/vision/bench/bench_vision.py [--batch 8] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import nn

# The gather reference and the measurement helpers are the core benchmark's own, so the
# layer-level and model-level figures compare against the same code.
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "packages/core_attention/bench"))
from _measure import median_seconds, peak_bytes
from bench_bilevel_routing import gather_bra

import attn_vision  # noqa: F401  (registers the models)
from attn_vision.models.halonet import use_core_halo_attention
from core_attention.layers.bilevel_routing import BiLevelRoutingAttention


class GatherBRA(nn.Module):
    """A routing layer that runs the official-style gather forward of the core benchmark
    (``bench_bilevel_routing.gather_bra``) with the weights of a ``BiLevelRoutingAttention``."""

    def __init__(self, ours: BiLevelRoutingAttention):
        super().__init__()
        self.ours = ours

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gather_bra(self.ours, x)


def with_gather_attention(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose routing layers run :class:`GatherBRA` (shared weights)."""
    model = copy.deepcopy(model)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, BiLevelRoutingAttention):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, GatherBRA(mod))
    return model


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
        times = median_seconds({"ref": ref_tasks[name], "ours": our_tasks[name]}, repeats)
        t_ref, t_our = times["ref"], times["ours"]
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
