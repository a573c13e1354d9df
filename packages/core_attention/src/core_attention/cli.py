"""The command-line skeleton shared by the apps' console scripts.

Each app owns one console script (``attn-speech``, ``attn-vision``, ...) with a subcommand
per task. An app's modules register their subcommands on the app's :class:`AppCommandLine`;
``--help`` lists every registered one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


class AppCommandLine:
    """``prog <command> [<subcommand>] [options]`` with argparse.

    ``add_command(name, help)`` returns an ``argparse`` parser for the command; give it
    ``set_defaults(func=callable)`` (the callable gets the parsed namespace and returns an
    exit status) or nested subcommands through :meth:`subcommands`.
    """

    def __init__(self, prog: str, description: str, version: str) -> None:
        self.parser = argparse.ArgumentParser(prog=prog, description=description)
        self.parser.add_argument("--version", action="version", version=f"{prog} {version}")
        self._commands = self.parser.add_subparsers(title="commands", metavar="<command>")
        self._registered: list[str] = []

    def add_command(self, name: str, help: str) -> argparse.ArgumentParser:
        self._registered.append(name)
        return self._commands.add_parser(name, help=help, description=help)

    @staticmethod
    def subcommands(parser: argparse.ArgumentParser):
        return parser.add_subparsers(title="subcommands", metavar="<subcommand>")

    def main(self, argv: list[str] | None = None) -> int:
        if not self._registered:
            self.parser.epilog = "This version of the app has no commands yet."
        args = self.parser.parse_args(argv)
        func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
        if func is None:
            self.parser.print_help(sys.stdout)
            return 0 if argv is None or len(argv) == 0 else 2
        return int(func(args) or 0)
