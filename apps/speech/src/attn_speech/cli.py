"""The ``attn-speech`` console script."""

from __future__ import annotations

from attn_speech import __version__
from core_attention.cli import AppCommandLine

CLI = AppCommandLine(
    prog="attn-speech",
    description="Speaker verification (ECAPA-TDNN) and speech enhancement (MambAttention).",
    version=__version__,
)


def main(argv: list[str] | None = None) -> int:
    return CLI.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
