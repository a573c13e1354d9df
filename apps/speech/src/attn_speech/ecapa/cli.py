"""``attn-speech ecapa ...``: import, embed, verify, eval, calibrate and train."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

from attn_speech.audio import AudioError, load_audio
from attn_speech.lists import ListError, read_manifest, read_trials
from attn_speech.outputs import OutputExistsError, check_writable, write_atomic, write_text_atomic

SPEECHBRAIN_DEFAULT_THRESHOLD = 0.25  # SpeechBrain's fixed verify_files threshold
BUILTIN = "builtin"


def builtin_model_path() -> Path:
    return Path(__file__).resolve().parent / "pretrained" / "espeak-c128"


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_any_model(spec: str, device: torch.device, log=None):
    """Our checkpoint folder, a SpeechBrain folder (imported in memory) or ``builtin``."""
    from attn_speech.ecapa.speaker import load_model
    from attn_speech.ecapa.speechbrain_import import import_speechbrain

    log = sys.stderr if log is None else log
    path = builtin_model_path() if spec == BUILTIN else Path(spec)
    if spec == BUILTIN and not (path / "config.json").is_file():
        raise FileNotFoundError("this install ships no built-in model; pass --model")
    if (path / "config.json").is_file():
        return load_model(path, device)
    if (path / "hyperparams.yaml").is_file():
        print(
            f"note: {path} is a SpeechBrain folder; importing it in memory "
            "(run 'attn-speech ecapa import-speechbrain' once to skip this)",
            file=log,
        )
        model, notes = import_speechbrain(path)
        for n in notes:
            print(f"note: {n}", file=log)
        return model.to(device)
    raise FileNotFoundError(
        f"{path}: neither a model folder (config.json) nor a SpeechBrain folder"
    )


def _common(p: argparse.ArgumentParser, model: bool = True) -> None:
    if model:
        p.add_argument(
            "--model",
            default=BUILTIN,
            help="model folder (ours or SpeechBrain's); default: the built-in espeak model",
        )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument(
        "--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help="files per batch; 0: 1 on CPU (padding costs more than batching gains), 16 on GPU",
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="network precision: bf16 is about 2x faster on CPUs with bf16 instructions, "
        "embeddings within cosine ~1e-5 of fp32 (default: fp32)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _setup(args) -> torch.device:
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    return _device(args.device)


def _embedder(args, device):
    from attn_speech.ecapa.inference import Embedder

    model = load_any_model(args.model, device)
    batch_size = args.batch_size or (16 if device.type == "cuda" else 1)
    return Embedder(
        model,
        device=device,
        batch_size=batch_size,
        normalize=getattr(args, "normalize", False),
        precision=args.precision,
    )


# --- import-speechbrain -----------------------------------------------------------------


def cmd_import(args) -> int:
    from attn_speech.ecapa.speechbrain_import import import_speechbrain

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise OutputExistsError(f"{out} exists and is not empty; pass --overwrite")
    model, notes = import_speechbrain(args.dir)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    model.save_pretrained(out)
    parts = [model.describe()]
    if model.embedding_mean is not None:
        parts.append("embedding mean")
    print(f"imported {args.dir} -> {out}: {', '.join(parts)}")
    return 0


# --- embed ------------------------------------------------------------------------------


def cmd_embed(args) -> int:
    device = _setup(args)
    paths = [Path(p) for p in args.files]
    for manifest in args.manifest or []:
        paths += [u.path for u in read_manifest(manifest, args.data_root)]
    if not paths:
        raise ListError("no input files: give FILES and/or --manifest")
    out = Path(args.out)
    targets = [out / "embeddings.npy", out / "index.csv", out / "errors.csv"]
    check_writable(targets, args.overwrite)
    embedder = _embedder(args, device)
    result = embedder.embed_files(paths, progress=not args.no_progress)

    def save(p: Path) -> None:
        with open(p, "wb") as f:
            np.save(f, result.embeddings.astype(np.float32))

    write_atomic(out / "embeddings.npy", save)
    index = io.StringIO()
    w = csv.writer(index, lineterminator="\n")
    w.writerow(["row", "path"])
    w.writerows((i, str(p)) for i, p in enumerate(result.paths))
    write_text_atomic(out / "index.csv", index.getvalue())
    (out / "errors.csv").unlink(missing_ok=True)
    if result.errors:
        err = io.StringIO()
        w = csv.writer(err, lineterminator="\n")
        w.writerow(["path", "error"])
        w.writerows((str(p), e) for p, e in result.errors)
        write_text_atomic(out / "errors.csv", err.getvalue())
    print(
        f"{len(result.paths)} embeddings ({result.embeddings.shape[1]}-d) -> "
        f"{out / 'embeddings.npy'}; {len(result.errors)} files failed"
        + (f" (see {out / 'errors.csv'})" if result.errors else "")
    )
    return 1 if result.errors else 0


# --- verify -----------------------------------------------------------------------------


def cmd_verify(args) -> int:
    device = _setup(args)
    embedder = _embedder(args, device)
    model = embedder.model
    wavs = [load_audio(p, model.sample_rate) for p in (args.a, args.b)]
    emb = embedder.embed_waveforms(wavs)
    score = float(torch.nn.functional.cosine_similarity(emb[0], emb[1], dim=0))
    if args.threshold is not None:
        threshold, origin = args.threshold, "given"
    elif model.threshold is not None:
        t = model.threshold
        threshold = t.value
        origin = f"calibrated ({t.method}{'' if t.target_far is None else f' {t.target_far:g}'})"
    else:
        threshold = SPEECHBRAIN_DEFAULT_THRESHOLD
        origin = "uncalibrated default; run 'ecapa calibrate'"
    same = score > threshold
    if args.json:
        print(
            json.dumps(
                {
                    "score": score,
                    "threshold": threshold,
                    "same_speaker": same,
                    "threshold_origin": origin,
                }
            )
        )
    else:
        verdict = "same speaker" if same else "different speakers"
        print(f"score {score:.4f}  threshold {threshold:.4f} ({origin})  -> {verdict}")
    return 0


# --- eval / calibrate -------------------------------------------------------------------


def _cohort(args) -> list[Path] | None:
    if not args.cohort:
        return None
    paths: list[Path] = []
    for item in args.cohort:
        p = Path(item)
        if p.suffix.lower() in (".csv", ".txt", ".lst", ".scp"):
            paths += [u.path for u in read_manifest(p, args.cohort_root)]
        else:
            paths.append(p)
    return paths


def cmd_eval(args) -> int:
    from attn_speech.ecapa.evaluate import score_trials
    from attn_speech.ecapa.metrics import VerificationResult
    from attn_speech.ecapa.plots import det_plot, score_histogram

    device = _setup(args)
    trials = read_trials(args.trials, args.data_root)
    out = Path(args.out)
    names = ["scores.txt", "metrics.json", "det.png", "scores.png", "errors.csv"]
    check_writable([out / n for n in names], args.overwrite)
    embedder = _embedder(args, device)
    res = score_trials(
        embedder, trials, _cohort(args), args.cohort_top_k, progress=not args.no_progress
    )
    metrics = {"cosine": VerificationResult.compute(*res.split()).__dict__}
    curves = {"cosine": res.split()}
    if res.normalized is not None:
        metrics["as-norm"] = VerificationResult.compute(*res.split(normalized=True)).__dict__
        curves[f"AS-norm (top {args.cohort_top_k})"] = res.split(normalized=True)
    metrics["trials"] = {"scored": len(res.trials), "skipped": res.skipped}
    metrics["model"] = str(args.model)
    lines = ["label enroll test score" + (" asnorm" if res.normalized is not None else "")]
    for i, t in enumerate(res.trials):
        row = f"{t.label} {t.enroll_id} {t.test_id} {res.scores[i]:.6f}"
        if res.normalized is not None:
            row += f" {res.normalized[i]:.6f}"
        lines.append(row)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "scores.txt", "\n".join(lines) + "\n")
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    (out / "errors.csv").unlink(missing_ok=True)
    if res.errors:
        write_text_atomic(
            out / "errors.csv", "path,error\n" + "".join(f'"{p}","{e}"\n' for p, e in res.errors)
        )
    write_atomic(out / "det.png", lambda p: det_plot(curves, p, f"DET: {Path(args.trials).name}"))
    pos, neg = res.split()
    thr = embedder.model.threshold.value if embedder.model.threshold else None
    write_atomic(out / "scores.png", lambda p: score_histogram(pos, neg, p, thr))
    for name, m in metrics.items():
        if isinstance(m, dict) and "eer" in m:
            print(
                f"{name:8s} EER {100 * m['eer']:.2f}%  minDCF(0.01) {m['min_dcf_01']:.4f}  "
                f"minDCF(0.05) {m['min_dcf_05']:.4f}  ({m['targets']} target / "
                f"{m['nontargets']} non-target trials)"
            )
    if res.skipped:
        print(f"{res.skipped} trials skipped: unreadable files listed in {out / 'errors.csv'}")
    print(f"scores, metrics and DET curve in {out}")
    return 0


def cmd_calibrate(args) -> int:
    from attn_speech.ecapa.config import Threshold, trials_label
    from attn_speech.ecapa.evaluate import score_trials
    from attn_speech.ecapa.metrics import eer, threshold_at_far
    from attn_speech.ecapa.speaker import save_model

    device = _setup(args)
    model_path = builtin_model_path() if args.model == BUILTIN else Path(args.model)
    out = Path(args.out) if args.out else model_path
    if not (model_path / "config.json").is_file():
        raise FileNotFoundError(f"{model_path}: calibrate needs one of our model folders")
    trials = read_trials(args.trials, args.data_root)
    embedder = _embedder(args, device)
    model = embedder.model
    if out == model_path and model.threshold is not None and not args.overwrite:
        raise OutputExistsError(
            f"{out} already holds a threshold ({model.threshold.value:.4f}); pass --overwrite "
            "or --out"
        )
    if out != model_path and out.exists() and any(out.iterdir()) and not args.overwrite:
        raise OutputExistsError(f"{out} exists and is not empty; pass --overwrite")
    res = score_trials(embedder, trials, progress=not args.no_progress)
    pos, neg = res.split()
    e, e_thr = eer(pos, neg)
    if args.method == "eer":
        value = e_thr
    else:
        value = threshold_at_far(neg, args.target_far)
    far = float(np.mean(neg > value))
    frr = float(np.mean(pos <= value))
    threshold = Threshold(
        value=value,
        method=args.method,
        target_far=args.target_far if args.method == "far" else None,
        trials=trials_label(args.trials),
        eer=e,
        extra={"far": far, "frr": frr, "targets": int(pos.size), "nontargets": int(neg.size)},
    )
    save_model(model.cpu().with_threshold(threshold), out)
    print(
        f"threshold {value:.4f} ({args.method}): FAR {100 * far:.2f}%  FRR {100 * frr:.2f}% "
        f"on {len(res.trials)} trials (EER {100 * e:.2f}%) -> {out / 'config.json'}"
    )
    return 0


# --- registration -----------------------------------------------------------------------


def _run(func):
    def wrapped(args) -> int:
        try:
            return func(args)
        except (AudioError, ListError, OutputExistsError, FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return wrapped


def register(cli) -> None:
    """Add ``ecapa`` and its subcommands to the app's command line."""
    p = cli.add_command("ecapa", "ECAPA-TDNN speaker verification (Desplanques et al. 2020)")
    sub = cli.subcommands(p)

    s = sub.add_parser(
        "import-speechbrain",
        help="convert a SpeechBrain ECAPA folder (hyperparams.yaml + *.ckpt) to ours",
    )
    s.add_argument("dir", help="SpeechBrain folder, e.g. a spkrec-ecapa-voxceleb download")
    s.add_argument("--out", required=True, help="model folder to write")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    s.set_defaults(func=_run(cmd_import))

    s = sub.add_parser("embed", help="embeddings of audio files -> embeddings.npy + index.csv")
    s.add_argument("files", nargs="*", help="audio files (any format soundfile reads)")
    s.add_argument(
        "--manifest",
        action="append",
        help="CSV with a wav/path column, or one path per line (repeatable)",
    )
    s.add_argument("--data-root", default=None, help="root of relative manifest paths")
    s.add_argument("--out", default="embeddings", help="output folder (default: embeddings)")
    s.add_argument("--normalize", action="store_true", help="subtract the model's embedding mean")
    s.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _common(s)
    s.set_defaults(func=_run(cmd_embed))

    s = sub.add_parser("verify", help="cosine score of two files and the same-speaker decision")
    s.add_argument("a", help="first audio file")
    s.add_argument("b", help="second audio file")
    s.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="decision threshold (default: the model's calibrated one, else 0.25)",
    )
    s.add_argument("--json", action="store_true", help="print JSON")
    _common(s)
    s.set_defaults(func=_run(cmd_verify))

    for name, help_text in (
        ("eval", "EER and minDCF of a trial list, scores file and DET curve"),
        ("calibrate", "store a decision threshold (at EER or a target FAR) in the model"),
    ):
        s = sub.add_parser(name, help=help_text)
        s.add_argument("--trials", required=True, help="VoxCeleb-format 'label enroll test' list")
        s.add_argument(
            "--data-root", default=None, help="root of trial paths (default: its folder)"
        )
        _common(s)
        s.add_argument("--overwrite", action="store_true", help="replace existing outputs")
        if name == "eval":
            s.add_argument(
                "--out", default="ecapa-eval", help="output folder (default: ecapa-eval)"
            )
            s.add_argument(
                "--cohort",
                nargs="+",
                default=None,
                help="AS-norm cohort: audio files or manifests of speakers outside the trials",
            )
            s.add_argument("--cohort-root", default=None, help="root of relative cohort paths")
            s.add_argument(
                "--cohort-top-k", type=int, default=200, help="AS-norm top-k (default: 200)"
            )
            s.set_defaults(func=_run(cmd_eval))
        else:
            s.add_argument(
                "--method",
                choices=("eer", "far"),
                default="eer",
                help="threshold rule (default: eer)",
            )
            s.add_argument(
                "--target-far", type=float, default=0.01, help="FAR for --method far (default 0.01)"
            )
            s.add_argument(
                "--out", default=None, help="write a calibrated copy here (default: update --model)"
            )
            s.set_defaults(func=_run(cmd_calibrate))

    from attn_speech.ecapa.train import register as register_train

    register_train(sub, _run)
