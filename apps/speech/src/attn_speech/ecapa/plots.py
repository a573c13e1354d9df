"""DET curves and score histograms as PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.stats import norm

from attn_speech.ecapa.metrics import error_rates

_TICKS = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.99]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def det_plot(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    path: str | Path,
    title: str = "DET curve",
    points: dict[str, tuple[float, float]] | None = None,
) -> Path:
    """Write a DET plot (miss vs false-alarm rate on normal-deviate axes).

    ``curves`` maps a legend label to ``(target scores, non-target scores)``; ``points``
    maps a label to ``(FAR, FRR)`` operating points to mark.
    """
    plt = _pyplot()
    lo = 5e-4
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    for label, (pos, neg) in curves.items():
        _, frr, far = error_rates(pos, neg)
        ax.plot(norm.ppf(np.clip(far, lo, 1 - lo)), norm.ppf(np.clip(frr, lo, 1 - lo)), label=label)
    for label, (far, frr) in (points or {}).items():
        ax.plot(
            norm.ppf(np.clip(far, lo, 1 - lo)),
            norm.ppf(np.clip(frr, lo, 1 - lo)),
            "o",
            label=label,
        )
    ticks = norm.ppf(_TICKS)
    labels = [f"{100 * t:g}" for t in _TICKS]
    ax.set_xticks(ticks, labels)
    ax.set_yticks(ticks, labels)
    ax.set_xlim(norm.ppf(lo), norm.ppf(0.6))
    ax.set_ylim(norm.ppf(lo), norm.ppf(0.6))
    ax.plot([norm.ppf(lo), norm.ppf(0.6)], [norm.ppf(lo), norm.ppf(0.6)], ":", color="grey", lw=0.8)
    ax.set_xlabel("false acceptance rate (%)")
    ax.set_ylabel("false rejection rate (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


def score_histogram(
    pos: np.ndarray, neg: np.ndarray, path: str | Path, threshold: float | None = None
) -> Path:
    """Histograms of target and non-target cosine scores, with the decision threshold."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(min(pos.min(), neg.min()), max(pos.max(), neg.max()), 40)
    ax.hist(neg, bins=bins, alpha=0.6, label=f"different speaker ({neg.size})", density=True)
    ax.hist(pos, bins=bins, alpha=0.6, label=f"same speaker ({pos.size})", density=True)
    if threshold is not None:
        ax.axvline(threshold, color="black", ls="--", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("cosine score")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path
