"""The shipped ECAPA-TDNN and the attn-demo stage that shows it."""

from __future__ import annotations

from importlib import metadata

from attn_speech.ecapa.cli import builtin_model_path
from attn_speech.ecapa.demo import STAGE
from attn_speech.ecapa.speaker import load_model
from core_attention.demo import StageContext


def test_shipped_model_is_small_and_calibrated():
    folder = builtin_model_path()
    assert (folder / "model.safetensors").stat().st_size < 4 * 2**20
    model = load_model(folder)
    assert model.threshold is not None and model.threshold.method == "eer"
    assert model.model_config.channels == (128, 128, 128, 128, 384)


def test_demo_stage_verifies_unseen_voices(tmp_path):
    entry = [e for e in metadata.entry_points(group="attn_demo.stages") if e.name == STAGE.name]
    assert entry and entry[0].load() is STAGE
    result = STAGE.run(StageContext(out_dir=tmp_path, seed=0))
    kinds = [a.kind for a in result.artifacts]
    assert kinds.count("image") == 2 and kinds.count("audio") == 2
    for a in result.artifacts:
        if a.path is not None:
            assert a.path.is_file() and a.path.parent == tmp_path
    metrics = dict(next(a.rows for a in result.artifacts if a.caption == "Verification metrics."))
    assert float(metrics["EER"].rstrip("%")) < 10.0  # chance is 50%
    decisions = next(a.rows for a in result.artifacts if a.kind == "table")
    assert decisions[0][-1] == "correct" and len(decisions) == 7
