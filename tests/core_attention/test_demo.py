"""attn-demo: discovery, the core stage's figure, the report and its safety rules."""

from __future__ import annotations

import pytest
import torch

from core_attention.demo import Artifact, Stage, StageResult, runner
from core_attention.demo.core_stage import local_block_mask


def test_demo_writes_report_with_core_figure(tmp_path, capsys):
    out = tmp_path / "report"
    assert runner.main(["--out", str(out), "--stages", "core"]) == 0
    html = (out / "index.html").read_text()
    assert '<img src="core/attention_maps.png"' in html
    png = (out / "core" / "attention_maps.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    printed = capsys.readouterr().out
    assert "core" in printed and "ok" in printed and "index.html" in printed


def test_uninstalled_or_stageless_apps_are_listed_as_skipped(monkeypatch, tmp_path, capsys):
    real = runner.metadata.distribution

    def fake_distribution(name):
        if name == "attn-vision":
            raise runner.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(runner.metadata, "distribution", fake_distribution)
    stages, skipped = runner.discover()
    assert stages[0].name == "core"
    reasons = {r.name: r.summary for r in skipped}
    assert "not installed" in reasons["attn-vision"]
    assert "pip install ./apps/vision" in reasons["attn-vision"]


def test_failing_stage_is_reported_and_others_still_run(tmp_path):
    def boom(ctx):
        raise RuntimeError("stage exploded")

    def fine(ctx):
        (ctx.out_dir / "t.txt").write_text("x")
        return StageResult("fine", [Artifact("table", rows=[("a", "b"), (1, 2)])])

    records = [
        runner.run_stage(Stage("bad", "Bad", "fails", boom), tmp_path, "cpu", 0),
        runner.run_stage(Stage("good", "Good", "works", fine), tmp_path, "cpu", 0),
    ]
    assert [r.status for r in records] == ["failed", "ok"]
    assert "stage exploded" in records[0].error
    index = runner.write_report(tmp_path, records)
    assert "stage exploded" in index.read_text() and "<td>1</td>" in index.read_text()


def test_refuses_to_overwrite_a_folder_it_did_not_write(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    with pytest.raises(SystemExit, match="--overwrite"):
        runner.main(["--out", str(out), "--stages", "core"])
    assert (out / "precious.txt").exists()


def test_local_block_mask_matches_window_definition():
    grid, block, halo = 10, 4, 2
    mask = local_block_mask(grid, block, halo)
    for q in range(grid * grid):
        qr, qc = divmod(q, grid)
        r0, c0 = qr // block * block, qc // block * block
        for k in range(grid * grid):
            kr, kc = divmod(k, grid)
            inside = r0 - halo <= kr < r0 + block + halo and c0 - halo <= kc < c0 + block + halo
            assert bool(mask[q, k]) == inside
    assert mask.dtype == torch.bool
