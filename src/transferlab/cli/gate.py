"""`transferlab gate --baseline REV_OR_EXP`: fail a change whose metrics fell past the thresholds.

Exit 0 when every check passes, 1 when one fails, 2 on a usage error or a missing metrics file.
Writes ``OUT/report.md`` (the Markdown report a pull request shows), ``OUT/error_diff.csv`` and
``OUT/error_diff.png``. Thresholds come from params.yaml's ``gate:`` section; each flag overrides
its key. The library is :mod:`transferlab.reports.gate`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

from transferlab.cli import error_diff as error_diff_command
from transferlab.core import atomic
from transferlab.core import params as params_module
from transferlab.reports import baseline as baseline_module
from transferlab.reports import error_diff, gate

FLAGS = {
    "min_test_accuracy": "lowest test accuracy allowed (gate.min_test_accuracy)",
    "max_macro_f1_drop": "most the test macro-F1 may fall below the baseline's (gate.max_macro_f1_drop)",
    "max_class_f1_drop": "most any class's test F1 may fall below the baseline's (gate.max_class_f1_drop)",
    "min_export_agreement": "lowest agreement of each exported format with evaluate; 0 = not gated",
}


def configure(parser) -> None:
    parser.add_argument(
        "--baseline", required=True, metavar="REV_OR_EXP", help="a git revision (HEAD, main, a sha) or an experiment"
    )
    for name, help_text in FLAGS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=float, default=None, help=help_text)
    parser.add_argument("--out", type=Path, default=Path("gate"), help="folder for report.md and the error diff")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default params.yaml)")
    parser.add_argument("--no-dvc", action="store_true", help="skip `dvc metrics diff` and `dvc params diff`")


def thresholds_from(params_path: Path, overrides: dict[str, float | None]) -> gate.Thresholds:
    """The params file's ``gate:`` section with every flag that was given in place of its key."""
    section = params_module.parse_section("gate", params_module.read_params_file(params_path).get("gate"))
    values = section.model_dump() | {name: value for name, value in overrides.items() if value is not None}
    return gate.Thresholds(**values)


def run(args) -> int:
    thresholds = thresholds_from(args.params, {name: getattr(args, name) for name in FLAGS})
    baseline = baseline_module.resolve(args.baseline)
    new = gate.parse_metrics(_workspace_text(gate.EVALUATE_METRICS), path=gate.EVALUATE_METRICS, where="the workspace")
    if new is None:
        raise ValueError(f"{gate.EVALUATE_METRICS} not found in the workspace; run the pipeline first (dvc repro)")
    old = gate.parse_metrics(
        baseline_module.read_text(baseline, gate.EVALUATE_METRICS), path=gate.EVALUATE_METRICS, where=baseline.label
    )
    if old is None:
        raise ValueError(
            f"{gate.EVALUATE_METRICS} is not in {baseline.label}: run the pipeline there and commit its metrics"
        )
    checks = gate.run_checks(
        new=new,
        baseline=old,
        thresholds=thresholds,
        new_export=gate.parse_metrics(
            _workspace_text(gate.EXPORT_METRICS), path=gate.EXPORT_METRICS, where="the workspace"
        ),
        baseline_export=gate.parse_metrics(
            baseline_module.read_text(baseline, gate.EXPORT_METRICS), path=gate.EXPORT_METRICS, where=baseline.label
        ),
        baseline_label=baseline.label,
    )
    for check in checks:
        print(check.message(), file=sys.stdout if check.passed else sys.stderr, flush=True)
    parts = _report_parts(args, baseline, checks, old, new)
    report = args.out / "report.md"
    atomic.write_text(report, gate.markdown_report(parts))
    verdict = "passed" if gate.passed(checks) else "FAILED"
    print(f"gate {verdict} against {baseline.label}; report: {report}", flush=True)
    return 0 if gate.passed(checks) else 1


def _workspace_text(path: str) -> str | None:
    file = Path(path)
    return file.read_text(encoding="utf-8") if file.is_file() else None


def _report_parts(args, baseline, checks, old, new) -> gate.ReportParts:
    try:
        diff, written = error_diff_command.diff_against(baseline, out=args.out, params_path=args.params)
        errors, files = error_diff.markdown(diff), [str(path) for path in written]
    except ValueError as error:  # the error diff informs; only the checks gate
        errors, files = f"Unavailable: {error}", []
    parts = gate.ReportParts(
        baseline_label=baseline.label,
        checks=checks,
        baseline_metrics=old,
        new_metrics=new,
        error_diff=errors,
        error_files=files,
    )
    if args.no_dvc:
        skipped = "skipped (--no-dvc)"
        return dataclasses.replace(parts, metrics_diff_problem=skipped, params_diff_problem=skipped)
    dvc = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")
    metrics_json, metrics_problem = gate.dvc_output(dvc, ["metrics", "diff", baseline.commit, "--json"])
    params_md, params_problem = gate.dvc_output(dvc, ["params", "diff", baseline.commit, "--md"])
    return dataclasses.replace(
        parts,
        metrics_diff=json.loads(metrics_json or "{}") if metrics_json is not None else None,
        metrics_diff_problem=metrics_problem,
        params_diff=params_md,
        params_diff_problem=params_problem,
    )
