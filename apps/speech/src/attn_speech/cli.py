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


register_ecapa(CLI)
register_enhance(CLI)
_register_make_data(CLI)


def main(argv: list[str] | None = None) -> int:
    return CLI.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
