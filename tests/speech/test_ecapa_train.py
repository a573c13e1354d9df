"""``ecapa train`` on the harness: a short run separates held-out espeak-ng voices clearly
better than the same network at initialisation, and fine-tuning from a SpeechBrain folder
gets a new head over the new speakers."""

from __future__ import annotations

import csv
from dataclasses import replace

import numpy as np
import pytest
import torch

from attn_speech.cli import main
from attn_speech.ecapa.config import ClassifierConfig, FbankConfig, variant
from attn_speech.ecapa.evaluate import score_trials
from attn_speech.ecapa.inference import Embedder
from attn_speech.ecapa.metrics import eer
from attn_speech.ecapa.speaker import EcapaSpeaker, load_model
from attn_speech.lists import read_trials
from attn_training import seed_everything

TRAIN = [
    "--variant", "ecapa_c128", "--channels", "32", "--batch-size", "16",
    "--crop-seconds", "1.2", "--lr", "1e-2", "--warmup-steps", "5", "--num-workers", "0",
    "--no-progress", "--seed", "0",
]  # fmt: skip


def held_out_separation(model: EcapaSpeaker, corpus) -> tuple[float, float]:
    """EER and d' (target minus non-target mean score over their pooled standard deviation)
    of the held-out test voices' trials; d' is continuous where 4 voices make the EER
    coarse (one target trial is 1/60)."""
    trials = read_trials(corpus / "trials.txt", corpus)
    pos, neg = score_trials(Embedder(model), trials, progress=False).split()
    d_prime = (pos.mean() - neg.mean()) / np.sqrt(0.5 * (pos.var() + neg.var()))
    return eer(pos, neg)[0], float(d_prime)


@pytest.mark.slow
def test_short_training_separates_held_out_speakers(corpus, tmp_path):
    out = tmp_path / "run"
    args = ["ecapa", "train", str(corpus / "train.csv"), "--output-dir", str(out)]
    args += [*TRAIN, "--max-steps", "40", "--save-every", "20", "--log-every", "5"]
    assert main(args) == 0
    trained = load_model(out / "final")
    assert trained.labels == sorted(
        {r["spk_id"] for r in csv.DictReader((corpus / "train.csv").open())}
    )
    assert (out / "checkpoints").is_dir()

    seed_everything(0)  # the same initial weights as the run's
    cfg = replace(variant("ecapa_c128"), channels=(32, 32, 32, 32, 96))
    initial = EcapaSpeaker(
        model=cfg, features=FbankConfig(), classifier=ClassifierConfig(out_neurons=8)
    ).eval()
    (eer_before, d_before), (eer_after, d_after) = (
        held_out_separation(initial, corpus),
        held_out_separation(trained, corpus),
    )
    # A random ECAPA already tells espeak voices apart by pitch and spectrum (EER about 6%,
    # d' about 2.6 at these weights); 40 steps on 8 other voices must improve on it
    # clearly (measured: EER 0.4%, d' 4.3), not just keep it.
    print(f"held-out EER {eer_before:.1%} -> {eer_after:.1%}; d' {d_before:.2f} -> {d_after:.2f}")
    assert eer_after < 0.5 * eer_before, (eer_before, eer_after)
    assert d_after > d_before + 1.0, (d_before, d_after)

    rows = [r for r in csv.DictReader((out / "metrics.csv").open()) if r.get("train/loss")]
    assert float(rows[-1]["train/loss"]) < 0.5 * float(rows[0]["train/loss"])
    assert float(rows[-1]["train/accuracy"]) > 0.5  # chance is 1/8


def test_fine_tune_speechbrain_import_with_new_head(corpus, speechbrain_folder, tmp_path):
    folder, sb_model, _, _ = speechbrain_folder(512)
    out = tmp_path / "ft"
    args = ["ecapa", "train", str(corpus / "train.csv"), "--output-dir", str(out)]
    args += ["--init-from", str(folder), "--max-steps", "2", "--batch-size", "2"]
    args += ["--crop-seconds", "0.6", "--lr", "1e-9", "--num-workers", "0", "--no-progress"]
    assert main(args) == 0
    tuned = load_model(out / "final")
    assert tuned.model_config.channels == (512, 512, 512, 512, 1536)
    assert tuned.classifier.weight.shape == (8, 192) and len(tuned.labels) == 8
    ours = tuned.embedding_model.state_dict()
    for key, value in sb_model.state_dict().items():
        if key.endswith("weight") and "norm" not in key:
            torch.testing.assert_close(ours[key], value, atol=1e-6, rtol=0)
    assert np.isfinite(tuned.embedding_mean.numpy()).all()
