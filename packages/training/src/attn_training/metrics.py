"""Metrics: a CSV file, TensorBoard events and a PNG of the curves.

``metrics.csv`` has one row per logged step and one column per metric (``step`` first);
training rows carry ``train/...`` columns, validation rows ``val/...`` columns. When a
run resumes from step ``s``, rows and events after ``s`` (written by the interrupted run
after its last checkpoint) are dropped, so the history has each step once.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CSV_NAME = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
PLOT_NAME = "training_curves.png"


class MetricsLogger:
    """Writes metrics on the main process; a no-op elsewhere (``enabled=False``)."""

    def __init__(
        self, output_dir: Path, *, start_step: int, enabled: bool = True, tensorboard: bool = True
    ) -> None:
        self.enabled = enabled
        self.csv_path = Path(output_dir) / CSV_NAME
        self.rows: list[dict[str, float]] = []
        self.columns: list[str] = ["step"]
        self._writer = None
        if not enabled:
            return
        if self.csv_path.is_file():
            with open(self.csv_path, newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or ["step"])
                self.rows = [
                    {k: float(v) for k, v in row.items() if v not in ("", None)} for row in reader
                ]
            self.rows = [r for r in self.rows if r.get("step", 0) <= start_step]
        self._rewrite()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(
                str(Path(output_dir) / TENSORBOARD_DIR),
                purge_step=start_step + 1 if start_step > 0 else None,
            )

    def _rewrite(self) -> None:
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(_csv_row(r) for r in self.rows)
        tmp.replace(self.csv_path)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record ``metrics`` at ``step``."""
        if not self.enabled:
            return
        row = {"step": float(step), **{k: float(v) for k, v in metrics.items()}}
        self.rows.append(row)
        new = [k for k in row if k not in self.columns]
        if new:
            self.columns.extend(new)
            self._rewrite()
        else:
            with open(self.csv_path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.columns).writerow(_csv_row(row))
        if self._writer is not None:
            for key, value in metrics.items():
                self._writer.add_scalar(key, float(value), step)

    def flush(self) -> None:
        """Push buffered TensorBoard events to disk."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """``(steps, values)`` of one metric."""
        pairs = [(r["step"], r[key]) for r in self.rows if key in r]
        return [p[0] for p in pairs], [p[1] for p in pairs]


def _csv_row(row: Mapping[str, float]) -> dict[str, Any]:
    return {k: int(v) if k == "step" else repr(v) for k, v in row.items()}


def plot_curves(logger: MetricsLogger, path: Path, *, title: str = "training") -> Path | None:
    """Training loss (and learning rate) beside every validation metric, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    val_keys = [c for c in logger.columns if c.startswith("val/")]
    steps, loss = logger.series("train/loss")
    if not steps and not val_keys:
        return None
    panels = 1 + len(val_keys)
    fig = Figure(figsize=(5.0 * min(panels, 3), 3.6 * math.ceil(panels / 3)), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(math.ceil(panels / 3), min(panels, 3), squeeze=False).ravel()
    ax = axes[0]
    ax.plot(steps, loss, color="tab:blue", lw=1.0, label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    lr_steps, lr = logger.series("train/lr")
    if lr_steps:
        twin = ax.twinx()
        twin.plot(lr_steps, lr, color="tab:orange", lw=0.8, alpha=0.7)
        twin.set_ylabel("learning rate", color="tab:orange")
    for ax, key in zip(axes[1:], val_keys):
        vs, values = logger.series(key)
        ax.plot(vs, values, marker="o", ms=3, color="tab:green")
        ax.set_xlabel("step")
        ax.set_title(key)
    for ax in axes[panels:]:
        ax.set_visible(False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
