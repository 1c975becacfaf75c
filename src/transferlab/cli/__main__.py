"""Entry point for ``python -m transferlab.cli``."""

from transferlab.cli import main

raise SystemExit(main())
