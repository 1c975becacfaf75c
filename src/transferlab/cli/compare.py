"""`transferlab compare NAME...`: one DVC experiment per backbone or stack, then a leaderboard.

First ``dvc repro augment`` brings the workspace's data stages up to date, and this process embeds
every candidate's rows the cache lacks (:func:`transferlab.reports.compare.prefetch`); then the
queue runs and finds them cached. A failed experiment's log is saved under ``--logs`` and its
path printed in the leaderboard.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
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
    parser.add_argument(
        "--no-prefetch", action="store_true", help="let each experiment embed on its own (and one at a time)"
    )
    parser.add_argument(
        "--logs", type=Path, default=Path("logs/compare"), help="where failed experiments' logs are saved"
    )


def run(args) -> int:
    dvc = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")

    def say(line: str) -> None:
        print(line, flush=True)

    failed: dict = {}
    if args.no_run:
        names = [compare.experiment_name(candidate, args.prefix) for candidate in args.candidates]
    else:
        # Experiments that may still embed run one at a time: no two ever embed at once.
        complete = False if args.no_prefetch else _prefetch(args, dvc, say)
        jobs = args.jobs if complete else 1
        if jobs != args.jobs:
            say(f"running the queue one experiment at a time (not {args.jobs}): experiments may still embed")
        names, failed = compare.run_experiments(
            args.candidates,
            dvc=dvc,
            overrides=args.overrides,
            jobs=jobs,
            report=say,
            prefix=args.prefix,
            logs=args.logs,
        )
    rows = compare.leaderboard_rows(compare.exp_show(dvc), names, compare.backbone_parameters)
    rows = [row for row in rows if row.experiment not in failed]
    if not rows and not failed:
        raise ValueError("no finished experiment to show; see `dvc queue status` and `dvc queue logs NAME`")
    say("")
    say(compare.format_table(rows, failed))
    if rows:
        say(f"\nplot: {compare.plot(rows, args.plot)}")
    return 0 if len(rows) == len(names) else 1


def _prefetch(args, dvc: str, say) -> bool:
    """Brings the data stages up to date, then embeds every candidate's missing rows here; complete or not."""
    say("prefetch: dvc repro augment (the rows every experiment embeds)")
    result = subprocess.run([dvc, "repro", "augment"], capture_output=True, text=True)
    if result.returncode != 0:
        raise ValueError(f"`dvc repro augment` failed:\n{result.stderr.strip() or result.stdout.strip()}")
    logging.basicConfig(level=logging.WARNING, format="[prefetch] %(message)s")
    return compare.prefetch(
        args.candidates,
        overrides=args.overrides,
        params_path=Path("params.yaml"),
        images=Path("data/raw/images"),
        splits=Path("data/splits"),
        augmented=Path("data/augmented/train.csv"),
        report=say,
    )
