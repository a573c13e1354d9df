"""``attn-vision export --model M --format onnx|torch-export``, checked against eager.

The exported program has the input shape ``[batch, 3, img, img]`` it was traced with, or,
with ``--dynamic-batch``, any batch size (traced at ``max(batch, 2)``: a batch of one would
be specialised). After writing it, the file is loaded back (``torch.export.load`` or
onnxruntime) and run on a fresh random input of that shape (and, for a dynamic batch, of
that batch plus two); the largest deviation from the eager model must stay within
``--atol + --rtol * |eager|`` or the command fails (and says by how much).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

from attn_vision.commands.common import add_model_arguments, load_model, refuse_overwrite, warn

SUFFIX = {"onnx": ".onnx", "torch-export": ".pt2"}


def _dynamic_shapes(dynamic_batch: bool):
    return ({0: torch.export.Dim("batch", min=1, max=65536)},) if dynamic_batch else None


def export_torch(model: nn.Module, example: torch.Tensor, path: Path, dynamic_batch=False):
    program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes(dynamic_batch))
    torch.export.save(program, path)

    def run(x: torch.Tensor) -> np.ndarray:
        loaded = torch.export.load(path).module()
        with torch.no_grad():
            return loaded(x).numpy()

    return run


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    opset: int | None,
    dynamic_batch: bool = False,
):
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeError("--format onnx needs onnx, onnxscript and onnxruntime") from None
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        opset_version=opset,
        input_names=["images"],
        dynamic_shapes=_dynamic_shapes(dynamic_batch),
    )
    program.save(str(path))

    def run(x: torch.Tensor) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]

    return run


def export(
    model: nn.Module,
    path: Path,
    *,
    fmt: str,
    input_shape: tuple[int, ...],
    rtol: float = 1e-4,
    atol: float = 1e-4,
    opset: int | None = None,
    seed: int = 0,
    dynamic_batch: bool = False,
) -> float:
    """Export ``model`` (on the CPU, eval mode) to ``path`` and check it; returns the largest
    absolute deviation from eager. Raises ``AssertionError`` when the check fails.
    ``dynamic_batch`` exports dimension 0 as symbolic and checks two batch sizes."""
    model = model.cpu().eval()
    g = torch.Generator().manual_seed(seed)
    input_shape = tuple(input_shape)
    if dynamic_batch:
        input_shape = (max(input_shape[0], 2), *input_shape[1:])
    example = torch.randn(input_shape, generator=g)
    if fmt == "onnx":
        run = export_onnx(model, example, path, opset, dynamic_batch)
    elif fmt == "torch-export":
        run = export_torch(model, example, path, dynamic_batch)
    else:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(SUFFIX)}")
    batches = (input_shape[0], input_shape[0] + 2) if dynamic_batch else (input_shape[0],)
    deviation = 0.0
    for batch in batches:
        check = torch.randn((batch, *input_shape[1:]), generator=g)
        with torch.no_grad():
            eager = model(check).numpy()
        got = run(check)
        deviation = max(deviation, float(np.abs(got - eager).max()))
        if not np.allclose(got, eager, rtol=rtol, atol=atol):
            raise AssertionError(
                f"{path}: exported model deviates from eager by up to {deviation:.3g} at batch "
                f"{batch} (allowed atol {atol} + rtol {rtol} x |eager|)"
            )
    return deviation


def run(args: argparse.Namespace) -> int:
    path = args.output or Path(f"{Path(args.model).name}{SUFFIX[args.format]}")
    refuse_overwrite(path, args.overwrite)
    model = load_model(args)
    size = args.img_size or model.pretrained_cfg["input_size"][-1]
    shape = (args.batch_size, model.pretrained_cfg["input_size"][0], size, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    deviation = export(
        model, path, fmt=args.format, input_shape=shape, rtol=args.rtol, atol=args.atol,
        opset=args.opset, dynamic_batch=args.dynamic_batch,
    )  # fmt: skip
    batch = "any batch" if args.dynamic_batch else f"input {list(shape)}"
    warn(f"wrote {path} ({batch}); max |exported - eager| = {deviation:.3g}")
    return 0


def register(cli) -> None:
    p = cli.add_command(
        "export", "export a model to ONNX or torch.export, checked numerically against eager"
    )
    add_model_arguments(p)
    p.add_argument("--format", choices=tuple(SUFFIX), default="onnx", help="(default: %(default)s)")
    p.add_argument(
        "--output", type=Path, default=None, help="file to write (default: <model>.onnx / .pt2)"
    )
    p.add_argument(
        "--img-size", type=int, default=None, help="input side (default: the model's input size)"
    )
    p.add_argument("--batch-size", type=int, default=1, help="input batch (default: %(default)s)")
    p.add_argument(
        "--dynamic-batch",
        action="store_true",
        help="export the batch dimension as dynamic (the file then takes any batch size)",
    )
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument(
        "--rtol", type=float, default=1e-4, help="check tolerance (default: %(default)s)"
    )
    p.add_argument(
        "--atol", type=float, default=1e-4, help="check tolerance (default: %(default)s)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.set_defaults(func=run)
