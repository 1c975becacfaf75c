"""`transferlab error-diff --baseline REV_OR_EXP`: test images fixed, newly wrong and wrong in both.

Matches the workspace's metrics/evaluate/test_predictions.csv with the baseline's by image sha256
and writes ``OUT/error_diff.csv`` and ``OUT/error_diff.png`` (the gate writes the same files).
The library is :mod:`transferlab.reports.error_diff`.
"""

from __future__ import annotations

from pathlib import Path

from transferlab.core import params as params_module
from transferlab.reports import baseline as baseline_module
from transferlab.reports import error_diff, gate


def configure(parser) -> None:
    parser.add_argument(
        "--baseline", required=True, metavar="REV_OR_EXP", help="a git revision (HEAD, main, a sha) or an experiment"
    )
    parser.add_argument("--out", type=Path, default=Path("gate"), help="folder for error_diff.csv and .png")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default params.yaml)")


def diff_against(baseline, *, out: Path, params_path: Path):
    """The workspace's test predictions against ``baseline``'s; writes the CSV and PNG into ``out``.

    Returns:
        ``(ErrorDiff, written paths)`` (see :func:`transferlab.reports.error_diff.against_baseline`).
    """
    download = params_module.parse_section("download", params_module.read_params_file(params_path).get("download"))
    return error_diff.against_baseline(
        baseline,
        predictions=gate.TEST_PREDICTIONS,
        baseline_predictions=gate.TEST_PREDICTIONS,
        images_directory=Path("data/raw/images"),
        out=out,
        max_image_pixels=download.max_image_pixels,
    )


def run(args) -> int:
    diff, written = diff_against(baseline_module.resolve(args.baseline), out=args.out, params_path=args.params)
    print(error_diff.markdown(diff))
    print(f"\nwritten: {', '.join(str(path) for path in written)}")
    return 0
