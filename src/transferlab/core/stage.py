"""One shape for every stage script: path flags, typed params sections, logging, clean errors.

A stage script declares what it reads and writes and gets them parsed and validated::

    @stage.define(
        "split",
        paths={"index": "the download stage's index.csv", "out": "folder for the split CSVs"},
        sections=("base", "split"),
    )
    def main(paths, base, split): ...


    if __name__ == "__main__":
        main()

Every path flag is required unless listed in ``optional``; ``--params`` names the params file
(default ``params.yaml``), and every loaded section arrives as its frozen pydantic model under
its own name (a dotted name such as ``download`` gives the whole section). A ``ValueError``
(bad input or params: the message says what to do) exits 1 with its message and no traceback;
Ctrl-C and SIGTERM exit 130 and 143 after the ``with`` blocks of :mod:`transferlab.core.atomic`
have removed partial outputs.
"""

from __future__ import annotations

import argparse
import functools
import logging
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from transferlab.core import params as params_module

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM, so cleanup runs as it does for Ctrl-C."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def parse_arguments(
    name: str, description: str, paths: Mapping[str, str], optional: Mapping[str, str], argv: Sequence[str] | None
) -> argparse.Namespace:
    """Parses ``--<path> VALUE`` flags (underscores become dashes) and ``--params``."""
    parser = argparse.ArgumentParser(prog=f"stages/{name}.py", description=description)
    for flag, help_text in paths.items():
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=Path, required=True, help=help_text)
    for flag, help_text in optional.items():
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=Path, default=None, help=help_text)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    return parser.parse_args(argv)


def run(name: str, body: Callable[[], None]) -> None:
    """Runs ``body`` as stage ``name``: logging set up, user errors and signals turned into exit codes."""
    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(message)s", stream=sys.stderr)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        body()
    except ValueError as error:
        print(f"\n{name}: error: {error}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt as interruption:
        how = "terminated" if isinstance(interruption, Terminated) else "interrupted"
        print(f"\n{name}: {how}; completed outputs are kept, partial ones were removed", file=sys.stderr)
        sys.exit(EXIT_TERMINATED if isinstance(interruption, Terminated) else EXIT_INTERRUPTED)
    finally:
        signal.signal(signal.SIGTERM, previous)


def define(
    name: str,
    *,
    paths: Mapping[str, str],
    sections: Sequence[str] | Mapping[str, str],
    optional: Mapping[str, str] | None = None,
) -> Callable[[Callable[..., None]], Callable[[Sequence[str] | None], None]]:
    """Declares a stage script's main; see the module docstring.

    Args:
        name: the stage's name (its key in dvc.yaml), used in log lines and errors.
        paths: required path flags, name -> help text; the same paths as the stage's deps/outs.
        sections: params sections to load and pass by name (``base``, the stage's own, ...), or a
            mapping argument name -> section name where a section's name would shadow a module.
        optional: path flags that may be absent (``None`` when they are).

    Returns:
        A decorator; the decorated function is called as ``main(paths, **sections)`` and the
        result, called with no arguments (or an argv list), runs the stage.
    """

    wanted = dict(sections) if isinstance(sections, Mapping) else {section: section for section in sections}

    def decorate(main: Callable[..., None]) -> Callable[[Sequence[str] | None], None]:
        description = (main.__module__ and sys.modules[main.__module__].__doc__ or name).strip().splitlines()[0]

        @functools.wraps(main)
        def entry(argv: Sequence[str] | None = None) -> None:
            def body() -> None:
                arguments = parse_arguments(name, description, paths, optional or {}, argv)
                loaded = {key: params_module.load_section(section, arguments.params) for key, section in wanted.items()}
                main(arguments, **loaded)

            run(name, body)

        return entry

    return decorate
