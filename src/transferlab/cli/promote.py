"""`transferlab promote [EXP | --best METRIC]`: rank the experiments, apply one, optionally branch it.

Shows the top of the ranking (``dvc exp show --json``; ties go to the cheaper extraction), applies
the chosen experiment to the workspace (``dvc exp apply``), makes a branch of it with ``--branch``
(``dvc exp branch``) and prints the params it brings (``dvc params diff``). Refuses, before
anything changes, while params.yaml or dvc.lock has uncommitted changes. The library is
:mod:`transferlab.reports.promote`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from transferlab.reports import compare, promote


def configure(parser) -> None:
    parser.add_argument("experiment", nargs="?", metavar="EXP", help="the experiment to apply (see `dvc exp show`)")
    parser.add_argument(
        "--best",
        metavar="METRIC",
        help="apply the experiment best by this metric: test.accuracy, or metrics/evaluate.json:val.macro_f1",
    )
    parser.add_argument("--lowest", action="store_true", help="lower is better for the metric (a loss)")
    parser.add_argument("--branch", metavar="NAME", help="also make a git branch of the experiment (dvc exp branch)")
    parser.add_argument("--prefix", help="only experiments whose names start with this (a `compare --prefix`)")
    parser.add_argument("--top", type=int, default=5, help="leaderboard lines shown (default 5)")
    parser.add_argument("--dry-run", action="store_true", help="show the ranking and the choice; change nothing")


def _dvc(dvc: str, *arguments: str) -> str:
    result = subprocess.run([dvc, *arguments], capture_output=True, text=True)
    if result.returncode != 0:
        raise ValueError(f"`dvc {' '.join(arguments)}` failed:\n{result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def run(args) -> int:
    if (args.experiment is None) == (args.best is None):
        raise ValueError(
            "name one experiment (transferlab promote EXP) or a metric (transferlab promote --best METRIC)"
        )
    if not args.dry_run:
        promote.refuse_if_uncommitted()
    dvc = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")
    metric = args.best or "test.accuracy"
    found = promote.candidates(compare.exp_show(dvc), metric)
    if args.prefix:
        found = [candidate for candidate in found if candidate.name.startswith(args.prefix)]
    ranked = promote.rank(found, lowest_first=args.lowest)
    chosen = promote.choose(ranked, found, args.experiment, metric)
    print(promote.format_leaderboard(ranked, metric, chosen=chosen.name, top=args.top))
    value = "?" if chosen.value is None else f"{chosen.value:.4f}"
    print(f"\n{'would promote' if args.dry_run else 'promoting'} {chosen.name} ({metric} {value})", flush=True)
    if args.dry_run:
        return 0
    _dvc(dvc, "exp", "apply", chosen.name)
    if args.branch:
        _dvc(dvc, "exp", "branch", chosen.name, args.branch)
        print(f"branch {args.branch} holds {chosen.name}")
    brought = _dvc(dvc, "params", "diff", "--md").strip()
    rows = [line for line in brought.splitlines() if line.startswith("|")]
    print("\nparams it brings (dvc params diff, HEAD -> workspace):")
    print(brought if len(rows) > 2 else "none: the experiment's params equal HEAD's")
    print("\nthe workspace now holds it: review, then `git add params.yaml dvc.lock metrics && git commit`")
    return 0
