"""The medical ``attn-demo`` stage: registered, and the shipped checkpoint segments wounds."""

from __future__ import annotations

import re
from importlib import metadata

import numpy as np
import pytest

from attn_medical.demo import STAGE, checkpoint_dir
from attn_medical.models import load_pretrained
from core_attention.demo import runner


def test_stage_is_registered_under_the_demo_group():
    found = {ep.name: ep.value for ep in metadata.entry_points(group="attn_demo.stages")}
    assert found.get("medical") == "attn_medical.demo:STAGE"


def test_shipped_checkpoint_is_small_and_loads_strictly():
    folder = checkpoint_dir()
    size = (folder / "model.safetensors").stat().st_size
    assert 100_000 < size < 1_000_000
    model = load_pretrained(folder)
    assert model.config.spatial_dims == 2 and model.config.preprocessing["patch_size"] == [96, 96]


@pytest.mark.slow
def test_demo_stage_segments_held_out_wounds(tmp_path):
    record = runner.run_stage(STAGE, tmp_path, "cpu", 0)
    assert record.status == "ok", record.error
    mean = float(re.search(r"mean Dice ([0-9.]+)", record.summary).group(1))
    assert mean >= 0.9
    image, table = record.result.artifacts
    assert image.path.is_file() and image.path.stat().st_size > 50_000
    dices = [float(row[2]) for row in table.rows[1:]]
    assert len(dices) == 6 and np.mean(dices) == pytest.approx(mean, abs=1e-3)
