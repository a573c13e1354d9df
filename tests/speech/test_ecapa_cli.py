"""verify / eval / calibrate end to end on an espeak-ng corpus; corpus and list files."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from attn_speech.cli import main
from attn_speech.ecapa.cli import builtin_model_path
from attn_speech.ecapa.hparams import HParams, Tagged
from attn_speech.ecapa.metrics import eer, threshold_at_far
from attn_speech.ecapa.speaker import load_model
from attn_speech.lists import ListError, read_trials


def test_corpus_layout(corpus):
    summary = json.loads((corpus / "corpus.json").read_text())
    rows = list(csv.DictReader((corpus / "manifest.csv").open()))
    assert len(rows) == 12 * 6 and {r["spk_id"] for r in rows} == {f"spk{i:03d}" for i in range(12)}
    train = {r["spk_id"] for r in csv.DictReader((corpus / "train.csv").open())}
    test = {r["spk_id"] for r in csv.DictReader((corpus / "test.csv").open())}
    assert not train & test and test == set(summary["test_speakers"]) and len(test) == 4
    voices = {(v["accent"], v["variant"], v["pitch"]) for v in summary["voices"]}
    assert len(voices) == 12
    trials = read_trials(corpus / "trials.txt", corpus)
    assert sum(t.label for t in trials) == 4 * 15  # every same-speaker pair
    for t in trials:
        same = t.enroll.parent.name == t.test.parent.name
        assert same == bool(t.label) and t.enroll.parent.name in test and t.enroll.is_file()


def test_eval_calibrate_verify(corpus, tiny_model, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    out = tmp_path / "eval"
    common = ["--trials", str(corpus / "trials.txt"), "--model", str(model), "--no-progress"]
    cohort = ["--cohort", str(corpus / "train.csv"), "--cohort-top-k", "20"]
    assert main(["ecapa", "eval", *common, "--out", str(out), *cohort]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    lines = (out / "scores.txt").read_text().splitlines()
    assert lines[0] == "label enroll test score asnorm" and len(lines) == 1 + 180
    labels = np.array([int(row.split()[0]) for row in lines[1:]])
    scores = np.array([float(row.split()[3]) for row in lines[1:]])
    assert metrics["cosine"]["eer"] == pytest.approx(
        eer(scores[labels == 1], scores[labels == 0])[0]
    )
    assert 0 <= metrics["as-norm"]["min_dcf_01"] <= 1.0
    assert (out / "det.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["ecapa", "eval", *common, "--out", str(out)]) == 2  # no --overwrite

    assert main(["ecapa", "calibrate", *common, "--method", "far", "--target-far", "0.05"]) == 0
    stored = load_model(model).threshold
    neg = scores[labels == 0]
    assert stored.method == "far" and stored.value == pytest.approx(
        threshold_at_far(neg, 0.05), abs=1e-5
    )
    assert stored.trials == "trials.txt"  # no machine-specific directory travels with it
    assert main(["ecapa", "calibrate", *common]) == 2  # would replace the stored threshold
    assert main(["ecapa", "calibrate", *common, "--overwrite"]) == 0
    assert load_model(model).threshold.method == "eer"

    capsys.readouterr()
    a, b = corpus / "wav/spk000/spk000_u00.wav", corpus / "wav/spk000/spk000_u01.wav"
    assert main(["ecapa", "verify", str(a), str(b), "--model", str(model), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["threshold"] == pytest.approx(load_model(model).threshold.value)
    assert result["same_speaker"] == (result["score"] > result["threshold"])
    assert main(["ecapa", "verify", str(a), str(b), "--model", str(model), "--threshold", "2"]) == 0
    assert "different speakers" in capsys.readouterr().out
    assert main(["ecapa", "verify", str(a), str(tmp_path / "none.wav"), "--model", str(model)]) == 2
    assert "none.wav: no such file" in capsys.readouterr().err


def test_trial_list_errors(tmp_path):
    bad = tmp_path / "t.txt"
    bad.write_text("1 a.wav b.wav\nmaybe a.wav c.wav\n")
    with pytest.raises(ListError, match=r"t\.txt:2"):
        read_trials(bad)
    bad.write_text("1 a.wav b.wav\n")
    with pytest.raises(ListError, match="non-target"):
        read_trials(bad)


def test_hparams_references():
    hp = HParams(
        "n: 80\nbase: /models\nc: !ref <n> * 2 + 1\npath: !ref <base>/x.ckpt\n"
        "obj: !new:some.Class\n    size: !ref <n>\n    chans: [!ref <c>, 3]\n"
        "nested: !ref <obj[size]>\n"
    )
    assert hp.get("c") == 161 and hp.get("path") == "/models/x.ckpt"
    obj = hp.get("obj")
    assert isinstance(obj, Tagged) and obj.target == "some.Class"
    assert obj.value == {"size": 80, "chans": [161, 3]} and hp.get("nested") == 80
    with pytest.raises(ValueError, match="circular"):
        HParams("a: !ref <b>\nb: !ref <a>\n").get("a")


def test_shipped_model_records_no_machine_paths():
    folder = builtin_model_path()
    text = (folder / "config.json").read_text()
    assert "/tmp" not in text and "\\" not in text
    assert load_model(folder).threshold.trials == "dev_trials.txt"
