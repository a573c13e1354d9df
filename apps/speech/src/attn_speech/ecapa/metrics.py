"""Verification metrics: EER, minimum detection cost, DET curve, adaptive score normalisation.

Conventions are SpeechBrain's (``speechbrain.utils.metric_stats``): a trial is accepted
when ``score > threshold``; candidate thresholds are the distinct scores and the midpoints
between neighbours; ``FRR(t) = P(target <= t)`` and ``FAR(t) = P(non-target > t)``.

The minimum detection cost here is *normalised* (NIST SRE, VoxSRC):
``minDCF = min_t C_det(t) / min(C_miss p_target, C_fa (1 - p_target))`` with
``C_det = C_miss p_target FRR + C_fa (1 - p_target) FAR``. SpeechBrain's ``minDCF`` returns
the unnormalised ``min_t C_det(t)``; at ``p_target = 0.01`` ours is 100x larger.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _split(pos, neg) -> tuple[np.ndarray, np.ndarray]:
    pos = np.asarray(pos, dtype=np.float64).ravel()
    neg = np.asarray(neg, dtype=np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        raise ValueError("need at least one target and one non-target score")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ValueError("scores must be finite")
    return pos, neg


def error_rates(pos, neg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(thresholds, FRR, FAR)`` over SpeechBrain's candidate thresholds (ascending)."""
    pos, neg = _split(pos, neg)
    scores = np.unique(np.concatenate([pos, neg]))
    thresholds = np.sort(np.concatenate([scores, (scores[:-1] + scores[1:]) / 2]))
    frr = np.searchsorted(np.sort(pos), thresholds, side="right") / pos.size
    far = 1.0 - np.searchsorted(np.sort(neg), thresholds, side="right") / neg.size
    return thresholds, frr, far


def eer(pos, neg) -> tuple[float, float]:
    """Equal error rate and its threshold: at the first threshold minimising
    ``|FAR - FRR|``, ``EER = (FAR + FRR) / 2`` (as ``speechbrain.utils.metric_stats.EER``)."""
    thresholds, frr, far = error_rates(pos, neg)
    i = int(np.argmin(np.abs(far - frr)))
    return float((far[i] + frr[i]) / 2), float(thresholds[i])


def min_dcf(
    pos,
    neg,
    p_target: float = 0.01,
    c_miss: float = 1.0,
    c_fa: float = 1.0,
    normalized: bool = True,
) -> tuple[float, float]:
    """Minimum detection cost and its threshold (normalised unless ``normalized=False``)."""
    thresholds, frr, far = error_rates(pos, neg)
    cost = c_miss * p_target * frr + c_fa * (1 - p_target) * far
    i = int(np.argmin(cost))
    value = float(cost[i])
    if normalized:
        value /= min(c_miss * p_target, c_fa * (1 - p_target))
    return value, float(thresholds[i])


def threshold_at_far(neg, target_far: float) -> float:
    """The lowest threshold whose false acceptance rate ``P(non-target > t)`` is at most
    ``target_far``."""
    if not 0 <= target_far < 1:
        raise ValueError(f"target FAR must be in [0, 1), got {target_far}")
    neg = np.sort(np.asarray(neg, dtype=np.float64).ravel())[::-1]
    k = int(np.floor(target_far * neg.size + 1e-9))  # accepted non-targets allowed
    return float(neg[min(k, neg.size - 1)])


@dataclass
class VerificationResult:
    """Metrics of one trial list."""

    eer: float
    eer_threshold: float
    min_dcf_01: float
    min_dcf_01_threshold: float
    min_dcf_05: float
    min_dcf_05_threshold: float
    targets: int
    nontargets: int

    @classmethod
    def compute(cls, pos, neg) -> VerificationResult:
        e, et = eer(pos, neg)
        d1, t1 = min_dcf(pos, neg, p_target=0.01)
        d5, t5 = min_dcf(pos, neg, p_target=0.05)
        return cls(e, et, d1, t1, d5, t5, int(np.size(pos)), int(np.size(neg)))


def as_norm(
    scores: np.ndarray,
    enroll_cohort: np.ndarray,
    test_cohort: np.ndarray,
    top_k: int = 200,
) -> np.ndarray:
    """Adaptive symmetric score normalisation (AS-norm; Cumani et al. 2011, Matejka et al.
    2017): each side is standardised by the mean and standard deviation of its ``top_k``
    highest cohort scores, and the two z-scores are averaged.

    Shapes: ``scores`` ``[N]``; ``enroll_cohort`` / ``test_cohort`` ``[N, cohort]`` scores of
    each trial's enrolment / test embedding against the cohort. Returns ``[N]``.
    """
    k = min(top_k, enroll_cohort.shape[1])
    if k < 2:
        raise ValueError("AS-norm needs a cohort of at least 2 embeddings")

    def stats(cohort: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        top = -np.sort(-cohort, axis=1)[:, :k]
        return top.mean(axis=1), np.maximum(top.std(axis=1), 1e-8)

    me, se = stats(enroll_cohort)
    mt, st = stats(test_cohort)
    return 0.5 * ((scores - me) / se + (scores - mt) / st)
