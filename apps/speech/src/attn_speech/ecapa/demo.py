"""Speaker verification on voices the shipped ECAPA-TDNN has never heard.

The ``attn-demo`` stage of attn-speech. A fresh espeak-ng corpus is synthesised, pairs of
its utterances are scored with the small ECAPA-TDNN shipped with attn-speech (trained by
``apps/speech/recipes/ecapa_espeak.sh``), and the decisions use the threshold calibrated on
the recipe's development voices.
"""

from __future__ import annotations

import numpy as np
import soundfile as sf

from attn_speech.corpus import make_speaker_corpus
from attn_speech.ecapa.cli import builtin_model_path
from attn_speech.ecapa.evaluate import score_trials
from attn_speech.ecapa.inference import Embedder
from attn_speech.ecapa.metrics import VerificationResult
from attn_speech.ecapa.plots import det_plot, score_histogram
from attn_speech.ecapa.speaker import load_model
from attn_speech.lists import read_trials
from core_attention.demo import Artifact, Stage, StageContext, StageResult


def run(ctx: StageContext) -> StageResult:
    corpus = ctx.out_dir / "corpus"
    # A seed unlike the recipe's (0), so the voices and sentences are new draws.
    make_speaker_corpus(
        corpus, speakers=10, utterances=4, test_speakers=8, seed=1000 + ctx.seed, progress=False
    )
    model = load_model(builtin_model_path(), ctx.device)
    trials = read_trials(corpus / "trials.txt", corpus)
    res = score_trials(Embedder(model, device=ctx.device), trials, progress=False)
    pos, neg = res.split()
    m = VerificationResult.compute(pos, neg)
    thr = model.threshold.value if model.threshold is not None else 0.25
    accept = res.scores > thr
    labels = res.labels
    far, frr = float(np.mean(accept[labels == 0])), float(np.mean(~accept[labels == 1]))

    det = det_plot(
        {"built-in ECAPA-TDNN": (pos, neg)},
        ctx.out_dir / "det.png",
        "DET curve on unseen espeak-ng voices",
        points={f"threshold {thr:.3f}": (far, frr)},
    )
    hist = score_histogram(pos, neg, ctx.out_dir / "scores.png", thr)

    rows = [("enrolment", "test", "same speaker?", "cosine score", "decision", "correct")]
    targets, nontargets = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    # Two typical pairs of each kind, then the hardest: the lowest-scoring same-speaker
    # pair and the highest-scoring different-speaker pair.
    picks = [*targets[:2], targets[np.argmin(res.scores[targets])]]
    picks += [*nontargets[:2], nontargets[np.argmax(res.scores[nontargets])]]
    for i in picks:
        t = res.trials[i]
        rows.append(
            (
                t.enroll_id,
                t.test_id,
                "yes" if t.label else "no",
                f"{res.scores[i]:.3f}",
                "accept" if accept[i] else "reject",
                "✓" if bool(accept[i]) == bool(t.label) else "✗",
            )
        )
    first = res.trials[picks[0]]
    audio = []
    for name, path in (("enrolment", first.enroll), ("test", first.test)):
        dest = ctx.out_dir / f"{name}.wav"
        data, rate = sf.read(path)
        sf.write(dest, data, rate)
        audio.append(Artifact("audio", f"{name} utterance of the first same-speaker pair", dest))
    summary = (
        f"EER {100 * m.eer:.1f}%, minDCF(0.01) {m.min_dcf_01:.3f} on {len(res.trials)} trials "
        f"of unseen voices; at the stored threshold FAR {100 * far:.1f}%, FRR {100 * frr:.1f}%"
    )
    metrics = [
        ("metric", "value"),
        ("EER", f"{100 * m.eer:.2f}%"),
        ("minDCF (p_target 0.01, normalised)", f"{m.min_dcf_01:.4f}"),
        ("minDCF (p_target 0.05, normalised)", f"{m.min_dcf_05:.4f}"),
        ("stored threshold", f"{thr:.4f}"),
        ("false acceptance / false rejection at it", f"{100 * far:.1f}% / {100 * frr:.1f}%"),
        ("trials (target / non-target)", f"{m.targets} / {m.nontargets}"),
        ("model", model.describe()),
    ]
    return StageResult(
        summary=summary,
        artifacts=[
            Artifact("table", "Example trials and the model's decisions.", rows=rows),
            Artifact("image", "DET curve with the operating point of the stored threshold.", det),
            Artifact("image", "Cosine scores of same- and different-speaker pairs.", hist),
            Artifact("table", "Verification metrics.", rows=metrics),
            *audio,
        ],
    )


STAGE = Stage(
    name="speaker-verification",
    title="attn-speech: ECAPA-TDNN speaker verification",
    description=__doc__.strip().splitlines()[0],
    run=run,
    order=10,
)
