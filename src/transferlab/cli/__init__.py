"""The `transferlab` console command.

Each sub-command lives in its own module under ``transferlab.cli`` with two functions,
``configure(parser)`` and ``run(args) -> int``; modules are imported only when their command
runs, so that a quick command does not pay for TensorFlow's start-up.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "backbones": ("transferlab.cli.backbones", "list the registered backbones, or describe a TFLite file"),
    "compare": ("transferlab.cli.compare", "run one experiment per backbone or stack and print a leaderboard"),
    "cache": (
        "transferlab.cli.cache",
        "embedding cache sizes per namespace, locally and in the shared S3 cache; prune the local one",
    ),
    "gate": (
        "transferlab.cli.gate",
        "fail (exit 1) when the workspace's metrics fell past the params' gate thresholds against a baseline",
    ),
    "promote": (
        "transferlab.cli.promote",
        "rank the experiments by a metric, apply the best (or a named one), optionally as a branch",
    ),
    "label-issues": (
        "transferlab.cli.label_issues",
        "images whose label looks wrong (cleanlab on out-of-sample predictions from the cached embeddings)",
    ),
    "error-diff": (
        "transferlab.cli.error_diff",
        "test images a change fixed, newly got wrong and still gets wrong, against a baseline",
    ),
    "predict": ("transferlab.cli.predict", "classify image files or folders with the exported model (models/export)"),
    "imagenet": (
        "transferlab.cli.imagenet",
        "classify photos into the 1000 ImageNet classes with a pretrained model and its top",
    ),
}


def build_parser(configure: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only the sub-command named ``configure`` gets its arguments.

    Sub-command modules are imported only for the command that runs (or whose help is asked).
    """
    parser = argparse.ArgumentParser(
        prog="transferlab", description="Which pretrained CNN backbone classifies your images best, and at what cost."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, summary) in COMMANDS.items():
        command_parser = subparsers.add_parser(name, help=summary, description=summary)
        if name == configure:
            importlib.import_module(module_name).configure(command_parser)
    return parser


def _version() -> str:
    from transferlab import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((argument for argument in argv if not argument.startswith("-")), None)
    parser = build_parser(configure=command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except ValueError as error:
        print(f"transferlab {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
