"""``attn-demo``: run every installed app's demo stage and write one HTML report."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

from tqdm.auto import tqdm

from core_attention.demo.report import StageRecord, write_report
from core_attention.demo.stage import Stage, StageContext

ENTRY_POINT_GROUP = "attn_demo.stages"
MARKER = ".attn-demo-report"

# The product's applications, in report order: (distribution, where it lives in the repo).
KNOWN_DISTRIBUTIONS = (
    ("core-attention", "packages/core_attention"),
    ("attn-speech", "apps/speech"),
    ("attn-vision", "apps/vision"),
    ("attn-video-gen", "apps/video_gen"),
    ("attn-medical", "apps/medical"),
)


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-")


def discover() -> tuple[list[Stage], list[StageRecord]]:
    """Load the registered stages; report apps that are absent or register none."""
    stages: list[Stage] = []
    skipped: list[StageRecord] = []
    by_dist: dict[str, int] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = _normalise(ep.dist.name) if ep.dist is not None else "?"
        by_dist[dist] = by_dist.get(dist, 0) + 1
        try:
            stage = ep.load()
        except Exception as exc:  # a missing optional dependency, a broken install
            skipped.append(
                StageRecord.skipped(ep.name, f"cannot load ({type(exc).__name__}: {exc})")
            )
            continue
        if not isinstance(stage, Stage):
            skipped.append(StageRecord.skipped(ep.name, f"{ep.value} is not a Stage"))
            continue
        stages.append(stage)
    for dist, where in KNOWN_DISTRIBUTIONS:
        try:
            metadata.distribution(dist)
        except metadata.PackageNotFoundError:
            skipped.append(
                StageRecord.skipped(dist, f"{dist} is not installed (pip install ./{where})")
            )
            continue
        if dist not in by_dist:
            skipped.append(StageRecord.skipped(dist, f"{dist} registers no demo stage yet"))
    stages.sort(key=lambda s: (s.order, s.name))
    return stages, skipped


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists() and not overwrite:
        raise SystemExit(
            f"attn-demo: {out} exists and holds files that are not an attn-demo report; "
            "choose another --out or pass --overwrite"
        )
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("written by attn-demo; replaced on the next run\n")


def run_stage(stage: Stage, root: Path, device: str, seed: int) -> StageRecord:
    folder = root / stage.name
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        result = stage.run(StageContext(out_dir=folder, device=device, seed=seed))
    except Exception:
        return StageRecord.for_stage(
            stage,
            "failed",
            seconds=time.perf_counter() - start,
            summary="failed (see report)",
            error=traceback.format_exc(),
        )
    return StageRecord.for_stage(
        stage,
        "ok",
        seconds=time.perf_counter() - start,
        summary=result.summary,
        folder=stage.name,
        result=result,
    )


def format_table(records: list[StageRecord]) -> str:
    rows = [("stage", "status", "seconds", "output")]
    rows += [(r.name, r.status, f"{r.seconds:.1f}", r.summary) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3])
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="attn-demo",
        description=(
            "Run the demo stage of every installed attention-apps application and write an "
            "HTML report."
        ),
    )
    p.add_argument(
        "--out", type=Path, default=Path("demo-out"), help="report folder (default: demo-out)"
    )
    p.add_argument(
        "--stages",
        nargs="+",
        metavar="NAME",
        default=None,
        help="run only these stages (default: all registered)",
    )
    p.add_argument("--list", action="store_true", help="list the registered stages and exit")
    p.add_argument("--device", default="cpu", help="torch device for the stages (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="random seed for the stages (default: 0)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out even when it holds files attn-demo did not write",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stages, skipped = discover()
    if args.list:
        for s in stages:
            print(f"{s.name:10s} {s.title}")
        for r in skipped:
            print(f"{r.name:10s} (skipped: {r.summary})")
        return 0
    if args.stages:
        unknown = set(args.stages) - {s.name for s in stages}
        if unknown:
            print(f"attn-demo: no such stage(s): {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        stages = [s for s in stages if s.name in args.stages]
        skipped = []
    for r in skipped:
        print(f"attn-demo: skipping {r.name}: {r.summary}")
    _prepare_out(args.out, args.overwrite)
    records: list[StageRecord] = []
    for stage in tqdm(stages, desc="attn-demo", unit="stage"):
        records.append(run_stage(stage, args.out, args.device, args.seed))
    records += skipped
    index = write_report(args.out, records)
    print(format_table(records))
    print(f"report: {index}")
    failed = [r.name for r in records if r.status == "failed"]
    if failed:
        for r in records:
            if r.error:
                print(f"--- {r.name} failed:\n{r.error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
