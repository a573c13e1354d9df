"""The ``attn-video`` console script."""

from __future__ import annotations

from attn_video_gen import __version__
from core_attention.cli import AppCommandLine

DESCRIPTION = (
    "Multi-condition video diffusion (UniVG) and DiT feature caching (ProfilingDiT) on diffusers."
)
CLI = AppCommandLine(
    prog="attn-video",
    description=DESCRIPTION,
    version=__version__,
)


def main(argv: list[str] | None = None) -> int:
    return CLI.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
