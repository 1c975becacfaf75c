"""The `transferlab` console command.

Each sub-command lives in its own module under ``transferlab.commands`` with two functions,
``configure(parser)`` and ``run(args) -> int``; modules are imported only when their command
runs, so that a quick command does not pay for TensorFlow's start-up.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "backbones": ("transferlab.commands.backbones", "list the registered backbones, or describe a TFLite file"),
    "compare": ("transferlab.commands.compare", "run one experiment per backbone or stack and print a leaderboard"),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per command (configured lazily)."""
    parser = argparse.ArgumentParser(prog="transferlab", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        subparsers.add_parser(name, help=summary, description=summary)
    return parser


def _version() -> str:
    from transferlab import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if not known.command:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[known.command][0])
    command_parser = argparse.ArgumentParser(prog=f"transferlab {known.command}", description=COMMANDS[known.command][1])
    module.configure(command_parser)
    args = command_parser.parse_args(argv[argv.index(known.command) + 1 :])
    try:
        return int(module.run(args) or 0)
    except ValueError as error:
        print(f"transferlab {known.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
