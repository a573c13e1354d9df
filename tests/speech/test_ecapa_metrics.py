"""EER against SpeechBrain's, normalised minDCF against a direct computation, AS-norm
against a float64 loop, the AAM-softmax loss against SpeechBrain's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from speechbrain.nnet.losses import AdditiveAngularMargin, LogSoftmaxWrapper
from speechbrain.utils.metric_stats import EER as sb_eer
from speechbrain.utils.metric_stats import minDCF as sb_min_dcf

from attn_speech.ecapa.loss import AAMSoftmaxLoss
from attn_speech.ecapa.metrics import as_norm, eer, min_dcf, threshold_at_far


def random_scores(seed: int, n_pos: int, n_neg: int, ties: bool = False):
    rng = np.random.default_rng(seed)
    pos = rng.normal(1.0, 1.0, n_pos)
    neg = rng.normal(-0.5, 1.2, n_neg)
    if ties:
        pos, neg = np.round(pos, 1), np.round(neg, 1)
    return pos.astype(np.float32), neg.astype(np.float32)


@pytest.mark.parametrize(
    ("seed", "n_pos", "n_neg", "ties"),
    [(0, 50, 213, False), (1, 97, 97, True), (2, 3, 40, False), (3, 301, 120, True)],
)
def test_eer_equals_speechbrain(seed, n_pos, n_neg, ties):
    pos, neg = random_scores(seed, n_pos, n_neg, ties)
    ref, ref_thr = sb_eer(torch.from_numpy(pos), torch.from_numpy(neg))
    ours, thr = eer(pos, neg)
    assert ours == pytest.approx(ref, abs=1e-6)
    assert thr == pytest.approx(ref_thr, abs=1e-6)


def direct_min_dcf(pos, neg, p_target):
    """min over every threshold of the normalised cost, with a plain loop in float64."""
    pos, neg = np.float64(pos), np.float64(neg)
    candidates = np.concatenate([[-np.inf], np.sort(np.concatenate([pos, neg]))])
    best = np.inf
    for t in candidates:
        p_miss = np.mean(pos <= t)
        p_fa = np.mean(neg > t)
        best = min(best, p_target * p_miss + (1 - p_target) * p_fa)
    return best / min(p_target, 1 - p_target)


@pytest.mark.parametrize("p_target", [0.01, 0.05])
@pytest.mark.parametrize("seed", [4, 5])
def test_min_dcf_normalised_against_direct_computation(seed, p_target):
    pos, neg = random_scores(seed, 80, 400)
    ours, thr = min_dcf(pos, neg, p_target)
    assert ours == pytest.approx(direct_min_dcf(pos, neg, p_target), abs=1e-9)
    assert ours <= 1.0 + 1e-12  # never worse than always rejecting
    raw, raw_thr = sb_min_dcf(torch.from_numpy(pos), torch.from_numpy(neg), p_target=p_target)
    assert ours * min(p_target, 1 - p_target) == pytest.approx(raw, abs=1e-6)
    assert thr == pytest.approx(raw_thr, abs=1e-6)


def test_threshold_at_far():
    _, neg = random_scores(6, 10, 1000)
    for far in (0.0, 0.01, 0.05, 0.2):
        t = threshold_at_far(neg, far)
        assert np.mean(neg > t) <= far + 1e-12
        assert np.mean(neg >= t) > far  # the lowest such threshold among the scores


def test_as_norm_against_loop():
    rng = np.random.default_rng(8)
    scores = rng.normal(size=17)
    ec, tc = rng.normal(size=(17, 31)), rng.normal(size=(17, 31))
    k = 10
    expected = np.empty(17)
    for i in range(17):
        e_top = sorted(ec[i], reverse=True)[:k]
        t_top = sorted(tc[i], reverse=True)[:k]
        ze = (scores[i] - np.mean(e_top)) / np.std(e_top)
        zt = (scores[i] - np.mean(t_top)) / np.std(t_top)
        expected[i] = (ze + zt) / 2
    np.testing.assert_allclose(as_norm(scores, ec, tc, top_k=k), expected, rtol=1e-12)


def test_aam_softmax_equals_speechbrain():
    cos = torch.rand(9, 13) * 2 - 1
    cos[0, 4] = -0.999  # target beyond pi - margin: the fallback branch
    labels = torch.randint(0, 13, (9,))
    labels[0] = 4
    ref = LogSoftmaxWrapper(AdditiveAngularMargin(margin=0.2, scale=30))(
        cos[:, None], labels[:, None]
    )
    torch.testing.assert_close(AAMSoftmaxLoss(0.2, 30.0)(cos, labels), ref, atol=1e-5, rtol=1e-6)
