"""`transferlab compare NAME...`: one DVC experiment per backbone or stack, then a leaderboard."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from transferlab.reports import compare


def configure(parser) -> None:
    parser.add_argument(
        "candidates",
        nargs="+",
        metavar="NAME",
        help="backbone specs, or stacks joined with '+' (mobilenet+mobilenet_v2)",
    )
    parser.add_argument(
        "--set",
        "-S",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra params for every experiment (as dvc exp run -S)",
    )
    parser.add_argument(
        "--jobs", "-j", type=int, default=1, help="experiments run at once (default 1: timings stay comparable)"
    )
    parser.add_argument(
        "--plot", type=Path, default=Path("metrics/compare.png"), help="where to write the accuracy-against-cost plot"
    )
    parser.add_argument(
        "--prefix",
        default="cmp",
        help="experiment names are PREFIX-<candidate> (default cmp); one prefix per comparison",
    )
    parser.add_argument("--no-run", action="store_true", help="only print the leaderboard of experiments already run")


def run(args) -> int:
    dvc = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")

    def say(line: str) -> None:
        print(line, flush=True)

    if args.no_run:
        names = [compare.experiment_name(candidate, args.prefix) for candidate in args.candidates]
    else:
        names = compare.run_experiments(
            args.candidates, dvc=dvc, overrides=args.overrides, jobs=args.jobs, report=say, prefix=args.prefix
        )
    rows = compare.leaderboard_rows(compare.exp_show(dvc), names, compare.backbone_parameters)
    if not rows:
        raise ValueError("no finished experiment to show; see `dvc queue status` and `dvc queue logs NAME`")
    say("")
    say(compare.format_table(rows))
    say(f"\nplot: {compare.plot(rows, args.plot)}")
    return 0 if len(rows) == len(names) else 1
