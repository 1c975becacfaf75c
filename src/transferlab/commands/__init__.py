"""Sub-commands of the `transferlab` console command (see transferlab.cli)."""
