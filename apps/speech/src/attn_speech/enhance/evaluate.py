"""``attn-speech enhance eval``: score enhanced (and, beside them, noisy) files against their
clean references with :mod:`attn_speech.enhance.metrics`; one CSV row per file and system,
plus a table of means.

Files are matched by path relative to the given folders, or listed in a CSV manifest with
``clean`` and ``enhanced`` columns (and optionally ``noisy``), relative to the manifest.
Every signal is read mono at 16 kHz; a file that cannot be read or scored is reported by
name and left out of the means.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from attn_speech.audio import AudioError, load_audio
from attn_speech.enhance.inference import AUDIO_SUFFIXES
from attn_speech.enhance.metrics import METRICS, SAMPLE_RATE, MetricError, score

__all__ = ["evaluate", "find_eval_rows", "summary_table"]

LENGTH_TOLERANCE = SAMPLE_RATE // 100  # 10 ms: resampling may round lengths differently


def find_eval_rows(
    clean: str | Path | None = None,
    enhanced: str | Path | None = None,
    noisy: str | Path | None = None,
    manifest: str | Path | None = None,
) -> list[dict[str, Path]]:
    """Rows ``{"clean": path, "enhanced": path[, "noisy": path]}``, from folders matched by
    relative path (a missing twin stays in the row, to be reported when scored) or from a
    manifest."""
    if manifest is not None:
        manifest = Path(manifest)
        with manifest.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            cols = set(reader.fieldnames or ())
            if not {"clean", "enhanced"} <= cols:
                raise ValueError(f"{manifest}: needs 'clean' and 'enhanced' columns")
            keys = [k for k in ("clean", "enhanced", "noisy") if k in cols]
            rows = [{k: manifest.parent / r[k] for k in keys} for r in reader]
        if not rows:
            raise ValueError(f"{manifest}: no rows")
        return rows
    if clean is None or enhanced is None:
        raise ValueError("give a manifest, or a clean and an enhanced folder")
    clean = Path(clean)
    files = sorted(
        f for f in clean.rglob("*") if f.is_file() and f.suffix.lower() in AUDIO_SUFFIXES
    )
    if not files:
        raise ValueError(f"{clean}: no audio files")
    rows = []
    for f in files:
        rel = f.relative_to(clean)
        row = {"clean": f, "enhanced": Path(enhanced) / rel}
        if noisy is not None:
            row["noisy"] = Path(noisy) / rel
        rows.append(row)
    return rows


def _load(path: Path):
    return load_audio(path, SAMPLE_RATE, min_seconds=0.0, silence_db=-200.0).numpy()


def evaluate(rows: list[dict[str, Path]], csv_path: str | Path) -> tuple[list[dict], list[str]]:
    """Score every row; write ``csv_path`` (columns ``file, system`` + :data:`METRICS`).

    Returns the scored records and the errors (``"<path>: <problem>"``).
    """
    records, errors = [], []
    for row in rows:
        try:
            clean = _load(row["clean"])
        except AudioError as exc:
            errors.append(str(exc))
            continue
        for system in ("enhanced", "noisy"):
            if system not in row:
                continue
            path = row[system]
            try:
                est = _load(path)
                if abs(est.size - clean.size) > LENGTH_TOLERANCE:
                    raise MetricError(
                        f"{est.size} samples at 16 kHz, its clean reference has {clean.size}"
                    )
                n = min(est.size, clean.size)
                values = score(clean[:n], est[:n])
            except (AudioError, MetricError) as exc:
                errors.append(str(exc) if isinstance(exc, AudioError) else f"{path}: {exc}")
                continue
            records.append({"file": str(row["clean"]), "system": system, **values})
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "system", *METRICS])
        writer.writeheader()
        for r in records:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    return records, errors


def summary_table(records: list[dict]) -> str:
    """Means per system, one line each (``enhanced`` first)."""
    lines = [f"{'system':10s} {'files':>5s} " + " ".join(f"{m:>7s}" for m in METRICS)]
    for system in ("enhanced", "noisy"):
        rs = [r for r in records if r["system"] == system]
        if not rs:
            continue
        means = [math.fsum(r[m] for r in rs) / len(rs) for m in METRICS]
        lines.append(f"{system:10s} {len(rs):5d} " + " ".join(f"{v:7.3f}" for v in means))
    return "\n".join(lines)
