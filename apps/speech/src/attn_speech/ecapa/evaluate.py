"""Scoring trial lists: embeddings once per file, cosine scores, optional AS-norm."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from attn_speech.ecapa.inference import Embedder
from attn_speech.ecapa.metrics import as_norm
from attn_speech.lists import Trial


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass
class TrialScores:
    """Scores of the trials whose files could be read, and the skipped ones."""

    trials: list[Trial]
    scores: np.ndarray  # cosine
    normalized: np.ndarray | None = None  # AS-norm, when a cohort was given
    errors: list[tuple[Path, str]] = field(default_factory=list)
    skipped: int = 0

    @property
    def labels(self) -> np.ndarray:
        return np.array([t.label for t in self.trials], dtype=np.int64)

    def split(self, normalized: bool = False) -> tuple[np.ndarray, np.ndarray]:
        s = self.normalized if normalized else self.scores
        if s is None:
            raise ValueError("no normalised scores (no cohort)")
        labels = self.labels
        return s[labels == 1], s[labels == 0]


def score_trials(
    embedder: Embedder,
    trials: list[Trial],
    cohort: list[Path] | None = None,
    top_k: int = 200,
    progress: bool = True,
    log=None,
) -> TrialScores:
    """Cosine score of every trial; with ``cohort`` files also AS-norm scores."""
    files = sorted({t.enroll for t in trials} | {t.test for t in trials})
    result = embedder.embed_files(files, progress=progress, log=log)
    table = dict(zip(result.paths, _unit(result.embeddings)))
    kept = [t for t in trials if t.enroll in table and t.test in table]
    if not kept:
        raise ValueError("no trial has both files readable")
    enroll = np.stack([table[t.enroll] for t in kept])
    test = np.stack([table[t.test] for t in kept])
    scores = np.sum(enroll * test, axis=1)
    out = TrialScores(kept, scores, errors=result.errors, skipped=len(trials) - len(kept))
    if cohort:
        cres = embedder.embed_files(cohort, progress=progress, log=log)
        out.errors += cres.errors
        c = _unit(cres.embeddings)
        if len(c) < 2:
            raise ValueError("AS-norm needs at least 2 readable cohort files")
        out.normalized = as_norm(scores, enroll @ c.T, test @ c.T, top_k=top_k)
    return out
