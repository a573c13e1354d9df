"""The shipped MambAttention and the attn-demo stage that shows it."""

from __future__ import annotations

import json
from importlib import metadata

import numpy as np
import soundfile as sf

from attn_speech.cli import main
from attn_speech.enhance.cli import builtin_model_path
from attn_speech.enhance.demo import STAGE
from attn_speech.enhance.model import MambAttention
from core_attention.demo import StageContext


def test_shipped_model_is_small_and_loads():
    folder = builtin_model_path()
    assert (folder / "model.safetensors").stat().st_size < 4 * 2**20
    config = json.loads((folder / "config.json").read_text())
    model = MambAttention.from_pretrained(folder)
    assert model.sample_rate == 16000
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert config


def test_demo_stage_enhances_the_clip(tmp_path):
    entry = [e for e in metadata.entry_points(group="attn_demo.stages") if e.name == STAGE.name]
    assert entry and entry[0].load() is STAGE
    result = STAGE.run(StageContext(out_dir=tmp_path, seed=0))
    kinds = [a.kind for a in result.artifacts]
    assert kinds.count("image") == 1 and kinds.count("audio") == 5
    for a in result.artifacts:
        if a.path is not None:
            assert a.path.is_file() and a.path.parent == tmp_path
    clean, rate = sf.read(tmp_path / "clean.wav")
    assert rate == 16000
    for name in ("noisy_pink", "enhanced_pink", "noisy_brown", "enhanced_brown"):
        assert sf.read(tmp_path / f"{name}.wav")[0].shape == clean.shape
    rows = next(a.rows for a in result.artifacts if a.kind == "table")
    assert rows[0] == ("noise", "metric", "noisy", "enhanced")
    scores = {(r[0].split()[0], r[1]): (float(r[2]), float(r[3])) for r in rows[1:]}
    assert set(scores) == {
        (n, m) for n in ("pink", "brown") for m in ("PESQ (wb)", "ESTOI", "SI-SDR dB")
    }
    # the shipped model beats the noisy input on the noise type it was trained with
    noisy, enhanced = scores[("pink", "SI-SDR dB")]
    assert enhanced > noisy
    noisy, enhanced = scores[("pink", "PESQ (wb)")]
    assert enhanced > noisy


def test_run_uses_the_shipped_model_by_default(tmp_path, capsys):
    rng = np.random.default_rng(0)
    sf.write(tmp_path / "x.wav", 0.1 * rng.standard_normal(8000).astype(np.float32), 16000)
    assert main(["enhance", "run", str(tmp_path / "x.wav"), "-o", str(tmp_path / "out")]) == 0
    assert sf.read(tmp_path / "out" / "x.wav")[0].shape == (8000,)
