"""The ``attn-medical`` console script."""

from __future__ import annotations

from attn_medical import __version__
from core_attention.cli import AppCommandLine

CLI = AppCommandLine(
    prog="attn-medical",
    description="Attention residual U-Net segmentation in 2D and 3D.",
    version=__version__,
)


def main(argv: list[str] | None = None) -> int:
    return CLI.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
