"""What every stage script shares: logging, and a user error as one clear line, not a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable


def run_stage(name: str, main: Callable[[], None]) -> None:
    """Runs a stage's ``main``; a ``ValueError`` (bad input or params) exits 1 with its message."""
    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(message)s", stream=sys.stderr)
    try:
        main()
    except ValueError as error:
        print(f"\n{name}: error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted; completed outputs are kept, partial ones were removed", file=sys.stderr)
        sys.exit(130)
