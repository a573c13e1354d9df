"""``attn-speech enhance ...``: ``run`` (enhance files and folders), ``train`` and ``eval``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from attn_speech.audio import AudioError
from attn_speech.outputs import OutputExistsError, check_writable

BUILTIN = "builtin"


def builtin_model_path() -> Path:
    """The small model shipped with attn-speech (``apps/speech/recipes/enhance_espeak.sh``)."""
    return Path(__file__).resolve().parent / "pretrained" / "espeak-c24"


def _inputs(paths: list[str], out: Path) -> list[tuple[Path, Path]]:
    """``(source, destination)``: files go to ``out/<name>``, folders keep their tree."""
    from attn_speech.enhance.inference import AUDIO_SUFFIXES

    jobs = []
    for spec in paths:
        path = Path(spec)
        if path.is_dir():
            for f in sorted(path.rglob("*")):
                if f.is_file() and f.suffix.lower() in AUDIO_SUFFIXES:
                    jobs.append((f, out / path.name / f.relative_to(path)))
        else:
            jobs.append((path, out / path.name))
    return jobs


def cmd_run(args: argparse.Namespace) -> int:
    from attn_speech.enhance.inference import enhance_file
    from attn_speech.enhance.model import MambAttention

    if args.threads:
        torch.set_num_threads(args.threads)
    path = builtin_model_path() if args.model == BUILTIN else Path(args.model)
    if not (path / "config.json").is_file():
        if args.model == BUILTIN:
            print("error: this install ships no built-in model; pass --model", file=sys.stderr)
        else:
            print(f"error: {args.model}: no model folder (config.json missing)", file=sys.stderr)
        return 2
    model = MambAttention.from_pretrained(path).eval().to(args.device)
    jobs = _inputs(args.inputs, Path(args.output))
    if not jobs:
        print("error: no audio files in the inputs", file=sys.stderr)
        return 2
    try:
        check_writable([dst for _, dst in jobs], args.overwrite)
    except OutputExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = 0
    for src, dst in jobs:
        try:
            r = enhance_file(model, src, dst, args.chunk_seconds, args.overlap_seconds)
            print(f"{src} -> {dst} ({r['seconds']:.2f} s at {r['rate']} Hz)")
        except (AudioError, OSError, RuntimeError) as exc:
            failed += 1
            msg = str(exc) if isinstance(exc, AudioError) else f"{src}: {exc}"
            print(f"error: {msg}", file=sys.stderr)
    print(f"{len(jobs) - failed} enhanced, {failed} failed -> {args.output}")
    return 1 if failed else 0


def cmd_train(args: argparse.Namespace) -> int:
    from attn_speech.enhance.data import PairedSpeech, find_pairs
    from attn_speech.enhance.discriminator import MetricDiscriminator
    from attn_speech.enhance.losses import LossWeights
    from attn_speech.enhance.model import MambAttention
    from attn_speech.enhance.train import DISCRIMINATOR, make_loss_fn
    from attn_training import AuxModel, TrainConfig, Trainer, seed_everything

    try:
        pairs = find_pairs(args.clean, args.noisy, args.manifest)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = TrainConfig.from_args(
        args,
        clean=args.clean,
        noisy=args.noisy,
        manifest=args.manifest,
        metric_discriminator=args.metric_discriminator,
    )
    seed_everything(config.seed)
    model = MambAttention(
        channels=args.channels,
        num_blocks=args.blocks,
        num_heads=args.heads,
        d_state=args.d_state,
        expand=args.expand,
    )
    dataset = PairedSpeech(pairs, segment=int(args.segment_seconds * model.sample_rate))
    weights = LossWeights(
        magnitude=args.w_magnitude,
        phase=args.w_phase,
        complex=args.w_complex,
        time=args.w_time,
        consistency=args.w_consistency,
        metric=args.w_metric,
    )
    loss_fn = make_loss_fn(model.stft, weights, metric_discriminator=args.metric_discriminator)
    aux = {}
    if args.metric_discriminator:
        aux[DISCRIMINATOR] = AuxModel(MetricDiscriminator(args.disc_channels))
    result = Trainer(model, dataset, config, loss_fn=loss_fn, aux_models=aux).fit()
    print(f"model in {result.final_dir}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from attn_speech.enhance.evaluate import evaluate, find_eval_rows, summary_table

    try:
        rows = find_eval_rows(args.clean, args.enhanced, args.noisy, args.manifest)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    records, errors = evaluate(rows, args.csv)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    print(summary_table(records))
    print(f"{len(records)} scored, {len(errors)} skipped -> {args.csv}")
    return 1 if errors else 0


def register(cli) -> None:
    """Add ``enhance`` and its subcommands to the app's command line."""
    from attn_training import add_train_arguments

    p = cli.add_command("enhance", "MambAttention speech enhancement (Kühne et al. 2025)")
    sub = cli.subcommands(p)

    s = sub.add_parser("run", help="enhance audio files and folders (any rate, any length)")
    s.add_argument("inputs", nargs="+", help="audio files or folders")
    s.add_argument("-o", "--output", default="enhanced", help="output folder (default: enhanced)")
    s.add_argument(
        "--model",
        default=BUILTIN,
        help="model folder (default: the shipped espeak-ng model, trained on synthetic speech)",
    )
    s.add_argument(
        "--chunk-seconds", type=float, default=4.0, help="chunk length of long files (default: 4)"
    )
    s.add_argument(
        "--overlap-seconds", type=float, default=0.5, help="chunk cross-fade (default: 0.5)"
    )
    s.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    s.add_argument("--threads", type=int, default=0, help="CPU threads; 0: torch's default")
    s.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("eval", help="PESQ, STOI, ESTOI, SI-SDR, SSNR against clean speech")
    s.add_argument("--clean", default=None, help="folder of clean references")
    s.add_argument("--enhanced", default=None, help="folder of enhanced files, same names")
    s.add_argument("--noisy", default=None, help="folder of noisy inputs, scored beside them")
    s.add_argument(
        "--manifest", default=None, help="CSV with clean,enhanced[,noisy] columns instead"
    )
    s.add_argument("--csv", default="enhance_eval.csv", help="per-file scores (CSV)")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("train", help="train on paired clean/noisy speech")
    s.add_argument("--clean", default=None, help="folder of clean files")
    s.add_argument("--noisy", default=None, help="folder of noisy files, same names as --clean")
    s.add_argument("--manifest", default=None, help="CSV with clean,noisy columns instead")
    s.add_argument(
        "--segment-seconds", type=float, default=2.0, help="random crop length (default: 2)"
    )
    s.add_argument("--channels", type=int, default=64, help="network width (default: 64)")
    s.add_argument("--blocks", type=int, default=4, help="time-frequency blocks (default: 4)")
    s.add_argument("--heads", type=int, default=8, help="attention heads (default: 8)")
    s.add_argument("--d-state", type=int, default=16, help="Mamba state size (default: 16)")
    s.add_argument("--expand", type=int, default=4, help="Mamba expansion (default: 4)")
    for name, default in (
        ("magnitude", 0.9),
        ("phase", 0.3),
        ("complex", 0.1),
        ("time", 0.2),
        ("consistency", 0.1),
        ("metric", 0.05),
    ):
        s.add_argument(
            f"--w-{name}", type=float, default=default, help=f"{name} loss weight ({default})"
        )
    s.add_argument(
        "--metric-discriminator",
        action="store_true",
        help="train MP-SENet's metric discriminator (predicts PESQ) beside the model and add "
        "its metric loss (--w-metric) to the generator's",
    )
    s.add_argument(
        "--disc-channels", type=int, default=16, help="discriminator width (default: 16)"
    )
    add_train_arguments(s, batch_size=4, lr=5e-4, output_dir="runs/enhance", max_steps=100_000)
    s.set_defaults(func=cmd_train)
