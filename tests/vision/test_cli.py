"""The attn-vision commands, run in-process on small models and real images."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from attn_vision.checkpoint import create_model, save_model_folder
from attn_vision.cli import main
from attn_vision.commands.common import eval_transform
from attn_vision.data import load_image
from attn_vision.demo.digits import MODEL_KWARGS

CLASSES = ["bright", "dark"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 2-class BiFormer folder (32x32 input) with class names, as train writes them."""
    torch.manual_seed(0)
    model = timm.create_model("biformer_tiny", num_classes=2, **MODEL_KWARGS)
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, 32, 32))
    folder = tmp_path_factory.mktemp("model") / "tiny"
    save_model_folder(model, folder, label_names=CLASSES)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Real photographs (skimage) of odd sizes in two class folders, and a broken file."""
    from skimage import data

    root = tmp_path_factory.mktemp("images")
    sources = {"bright": [data.coffee(), data.chelsea()], "dark": [data.camera(), data.coins()]}
    for label, arrays in sources.items():
        (root / label).mkdir()
        for k, arr in enumerate(arrays):
            img = Image.fromarray(arr).convert("RGB")
            img = img.resize((97 + 13 * k, 61 + 7 * k))
            img.save(root / label / f"{k}.png")
    (root / "broken.jpg").write_bytes(b"not an image at all")
    return root


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("infer", "eval", "train", "attention-map", "export"):
        assert command in out


def test_infer_csv_matches_the_model_and_skips_bad_images(model_dir, images, capsys):
    assert main(["infer", str(images), "--model", str(model_dir), "--top-k", "2"]) == 0
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.err
    rows = list(csv.DictReader(io.StringIO(captured.out)))
    paths = sorted({r["path"] for r in rows})
    assert len(paths) == 4 and not any("broken" in p for p in paths)
    model = create_model(str(model_dir)).eval()
    transform = eval_transform(model)
    for path in paths:
        mine = [r for r in rows if r["path"] == path]
        assert [r["rank"] for r in mine] == ["1", "2"]
        assert {r["class_name"] for r in mine} == set(CLASSES)
        with torch.no_grad():
            probs = model(transform(load_image(path))[None]).softmax(-1)[0]
        for r in mine:
            assert float(r["probability"]) == pytest.approx(
                float(probs[int(r["class_index"])]), abs=1e-5
            )


def test_infer_json_and_overwrite(model_dir, images, tmp_path):
    out = tmp_path / "pred.json"
    args = ["infer", str(images / "dark"), str(images / "broken.jpg"), "--model", str(model_dir)]
    assert main([*args, "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert len(data["predictions"]) == 2 and len(data["predictions"][0]["top_k"]) == 2
    assert "broken.jpg" in data["errors"][0]
    with pytest.raises(FileExistsError, match="--overwrite"):
        main([*args, "--output", str(out)])


def test_eval_metrics_agree_with_predictions(model_dir, images, tmp_path, capsys):
    (images / "broken.jpg").rename(images / "dark" / "broken.jpg")
    try:
        out = tmp_path / "eval"
        assert (
            main(
                [
                    "eval",
                    str(images),
                    "--model",
                    str(model_dir),
                    "--output-dir",
                    str(out),
                    "--no-progress",
                ]
            )
            == 0
        )
    finally:
        (images / "dark" / "broken.jpg").rename(images / "broken.jpg")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 4 and len(metrics["skipped"]) == 1
    model = create_model(str(model_dir)).eval()
    transform = eval_transform(model)
    hits = 0
    for label, name in enumerate(CLASSES):
        for f in sorted((images / name).glob("*.png")):
            with torch.no_grad():
                hits += int(model(transform(load_image(f))[None]).argmax() == label)
    assert metrics["top1"] == pytest.approx(hits / 4)
    assert metrics["top5"] == 1.0
    per_class = list(csv.DictReader((out / "per_class.csv").open()))
    assert [r["class_name"] for r in per_class] == CLASSES
    assert Image.open(out / "confusion_matrix.png").size[0] > 100


def test_attention_map_png(model_dir, images, tmp_path):
    out = tmp_path / "maps.png"
    image = str(images / "dark" / "0.png")
    assert main(["attention-map", image, "--model", str(model_dir), "--output", str(out)]) == 0
    assert Image.open(out).size[0] > 200
    with pytest.raises(ValueError, match=r"stages\.0\.blocks\.0\.attn"):
        main(["attention-map", image, "--model", str(model_dir), "--layers", "stem.0",
              "--output", str(tmp_path / "x.png")])  # fmt: skip


def test_export_torch_export_checked(model_dir, tmp_path):
    out = tmp_path / "model.pt2"
    assert (
        main(
            ["export", "--model", str(model_dir), "--format", "torch-export", "--output", str(out)]
        )
        == 0
    )
    program = torch.export.load(out)
    model = create_model(str(model_dir)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-4, atol=1e-4)


def test_export_torch_export_dynamic_batch(model_dir, tmp_path):
    out = tmp_path / "model.pt2"
    argv = ["export", "--model", str(model_dir), "--format", "torch-export", "--output", str(out)]
    assert main([*argv, "--dynamic-batch"]) == 0
    program = torch.export.load(out).module()
    model = create_model(str(model_dir)).eval()
    for batch in (1, 3, 6):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(program(x), model(x), rtol=1e-4, atol=1e-4)


def test_biformer_tiny_exports_with_dynamic_batch_at_224():
    """The routed (region-chunked) fine level at BiFormer-T's own sizes, batch symbolic."""
    model = timm.create_model("biformer_tiny", num_classes=3).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(
        model, (torch.randn(2, 3, 224, 224),), dynamic_shapes=({0: batch},)
    ).module()
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(program(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_export_onnx_checked(model_dir, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    assert (
        main(["export", "--model", str(model_dir), "--format", "onnx", "--output", str(out)]) == 0
    )
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    model = create_model(str(model_dir)).eval()
    x = torch.randn(1, 3, 32, 32)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-4)


def test_export_check_catches_a_wrong_program(model_dir, tmp_path, monkeypatch):
    from attn_vision.commands import export as export_mod

    def broken(model, example, path, *args):
        return lambda x: model(x).detach().numpy() + 1e-2

    monkeypatch.setattr(export_mod, "export_torch", broken)
    with pytest.raises(AssertionError, match="deviates from eager"):
        main(["export", "--model", str(model_dir), "--format", "torch-export",
              "--output", str(tmp_path / "m.pt2")])  # fmt: skip


def test_fine_tune_official_layout_checkpoint_with_new_head(tmp_path, images, refs):
    official = refs.OfficialBiFormer(
        depth=MODEL_KWARGS["depths"], embed_dim=MODEL_KWARGS["embed_dims"], head_dim=16,
        n_win=MODEL_KWARGS["n_win"], topks=MODEL_KWARGS["topks"], num_classes=1000,
    )  # fmt: skip
    refs.randomize_(official)
    ckpt = tmp_path / "official.pth"
    torch.save({"model": official.state_dict()}, ckpt)
    kwargs = [f"{k}={v!r}" for k, v in MODEL_KWARGS.items()]
    out = tmp_path / "run"
    args = [
        "train", str(images), "--model", "biformer_tiny", "--model-kwargs", *kwargs,
        "--img-size", "32", "--init-from", str(ckpt), "--val-split", "0",
        "--batch-size", "2", "--max-steps", "2", "--lr", "1e-5", "--num-workers", "0",
        "--output-dir", str(out), "--no-progress", "--aa", "", "--warmup-steps", "0",
    ]  # fmt: skip
    assert main(args) == 0
    trained = create_model(str(out / "final"))
    assert trained.num_classes == 2 and trained.pretrained_cfg["label_names"] == CLASSES
    assert trained.pretrained_cfg["input_size"] == (3, 32, 32)
    # The backbone came from the official checkpoint (two tiny steps barely move it).
    stem = official.state_dict()["downsample_layers.0.0.weight"]
    assert (trained.stem[0].weight - stem).abs().max() < 1e-3
