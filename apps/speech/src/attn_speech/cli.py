"""The ``attn-speech`` console script."""

from __future__ import annotations

import sys

from attn_speech import __version__
from attn_speech.ecapa.cli import register as register_ecapa
from attn_speech.enhance.cli import register as register_enhance
from core_attention.cli import AppCommandLine

CLI = AppCommandLine(
    prog="attn-speech",
    description="Speaker verification (ECAPA-TDNN) and speech enhancement (MambAttention).",
    version=__version__,
)


def cmd_make_speakers(args) -> int:
    from attn_speech.corpus import make_speaker_corpus

    try:
        s = make_speaker_corpus(
            args.out,
            speakers=args.speakers,
            utterances=args.utterances,
            test_speakers=args.test_speakers,
            dev_speakers=args.dev_speakers,
            seed=args.seed,
            overwrite=args.overwrite,
            workers=args.workers,
            progress=not args.no_progress,
        )
    except (FileExistsError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{s['speakers']} speakers x {s['utterances_per_speaker']} utterances "
        f"({60 * s['hours']:.1f} min) -> {args.out}: manifest.csv, train.csv, test.csv "
        f"({len(s['test_speakers'])} test, {len(s['dev_speakers'])} dev speakers), trials.txt "
        f"({s['trials']['target']} target / {s['trials']['nontarget']} non-target)"
    )
    return 0


def cmd_make_noisy(args) -> int:
    from attn_speech.enhance.noisy_corpus import make_noisy_corpus

    try:
        s = make_noisy_corpus(
            args.out,
            train=args.train,
            test=args.test,
            snr_range=(args.snr_min, args.snr_max),
            train_noises=tuple(args.train_noises.split(",")),
            unseen_noises=tuple(args.unseen_noises.split(",")),
            noise_dir=args.noise_dir,
            speakers=args.speakers,
            seed=args.seed,
            workers=args.workers,
            overwrite=args.overwrite,
        )
    except (FileExistsError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for split, n in s["pairs"].items():
        print(f"{split}: {n} pairs, noises {', '.join(s['noises'][split])}")
    print(f"-> {args.out}: train.csv, test.csv, test_unseen.csv (columns clean,noisy)")
    return 0


def _register_make_data(cli: AppCommandLine) -> None:
    p = cli.add_command("make-data", "synthesise offline data sets")
    sub = cli.subcommands(p)
    s = sub.add_parser("speakers", help="speaker corpus with espeak-ng voices, split and trials")
    s.add_argument("--out", default="speakers", help="output folder (default: speakers)")
    s.add_argument("--speakers", type=int, default=40, help="number of voices (default: 40)")
    s.add_argument("--utterances", type=int, default=8, help="utterances per voice (default: 8)")
    s.add_argument(
        "--test-speakers", type=int, default=10, help="held-out voices for trials (default: 10)"
    )
    s.add_argument(
        "--dev-speakers",
        type=int,
        default=0,
        help="voices held out for validation/calibration: dev.csv, dev_trials.txt (default: 0)",
    )
    s.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    s.add_argument("--workers", type=int, default=2, help="parallel espeak-ng calls (default: 2)")
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_make_speakers)

    s = sub.add_parser("noisy", help="clean/noisy pairs: espeak-ng speech in synthetic noise")
    s.add_argument("--out", default="noisy", help="output folder (default: noisy)")
    s.add_argument("--train", type=int, default=200, help="training pairs (default: 200)")
    s.add_argument("--test", type=int, default=40, help="pairs per test split (default: 40)")
    s.add_argument("--snr-min", type=float, default=-5.0, help="lowest SNR in dB (default: -5)")
    s.add_argument("--snr-max", type=float, default=15.0, help="highest SNR in dB (default: 15)")
    s.add_argument(
        "--train-noises",
        default="white,pink,babble",
        help="noise types of train and test: white, pink, brown, babble, hum, folder "
        "(default: white,pink,babble)",
    )
    s.add_argument(
        "--unseen-noises",
        default="brown,hum",
        help="noise types of test_unseen only (default: brown,hum)",
    )
    s.add_argument("--noise-dir", default=None, help="noise recordings for the type 'folder'")
    s.add_argument("--speakers", type=int, default=24, help="speech voices (default: 24)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    s.add_argument("--workers", type=int, default=2, help="parallel espeak-ng calls (default: 2)")
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    s.set_defaults(func=cmd_make_noisy)


register_ecapa(CLI)
register_enhance(CLI)
_register_make_data(CLI)


def main(argv: list[str] | None = None) -> int:
    return CLI.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
