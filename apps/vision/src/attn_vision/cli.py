"""The ``attn-vision`` console script."""

from __future__ import annotations

from attn_vision import __version__
from attn_vision.commands import attention_map, evaluate, export, infer, train
from core_attention.cli import AppCommandLine

CLI = AppCommandLine(
    prog="attn-vision",
    description="BiFormer and HaloNet image backbones on timm.",
    version=__version__,
)
for _command in (infer, evaluate, train, attention_map, export):
    _command.register(CLI)


def main(argv: list[str] | None = None) -> int:
    return CLI.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
