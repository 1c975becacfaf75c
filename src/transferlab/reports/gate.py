"""The CI gate: the workspace's metrics against a baseline's, under thresholds versioned in params.yaml.

DVC shows metric differences but cannot fail on them (dvc#10408); `transferlab gate` does:

- ``test.accuracy`` at least ``gate.min_test_accuracy`` (an absolute floor);
- ``test.macro_f1`` at most ``gate.max_macro_f1_drop`` below the baseline's;
- no class's test F1 more than ``gate.max_class_f1_drop`` below the baseline's;
- every exported format's agreement with evaluate (metrics/export.json) at least
  ``gate.min_export_agreement`` (0 leaves the export out).

Exit codes (:mod:`transferlab.cli.gate`): 0 when every check passes, 1 when any fails, 2 when a
metric or file it needs is missing (a ``ValueError`` that names it). Every check's line names
the metric, the baseline value, the new value and the threshold.

The Markdown report always shows the gated metrics, changed or not (``dvc metrics diff`` omits
unchanged ones, so a pull request that changes nothing used to show only timing noise), then the
per-class F1 deltas, the error diff, ``dvc metrics diff`` without timing and ``dvc params diff``;
timing and cache figures, which depend on the machine, come last in a section of their own.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EVALUATE_METRICS = "metrics/evaluate.json"
EXPORT_METRICS = "metrics/export.json"
TEST_PREDICTIONS = "metrics/evaluate/test_predictions.csv"
# Shown in the headline table whether they changed or not (the gated ones first).
HEADLINE = (
    "test.accuracy",
    "test.macro_f1",
    "test.balanced_accuracy",
    "test.top2_accuracy",
    "test.log_loss",
    "val.accuracy",
    "val.macro_f1",
)
# Metrics whose value depends on the machine or on what the embedding cache held, not on the model.
MACHINE_DEPENDENT = re.compile(
    r"(seconds|per_second|latency|_ms$|cache_hits|cache_bytes|embedded|corrupt_entries|\.bytes$)"
)
# A check passes when within this of its threshold: metrics are written rounded, and an
# unchanged workspace must never fail on float noise.
TOLERANCE = 1e-9


@dataclass(frozen=True)
class Thresholds:
    """The gate's thresholds (params.yaml ``gate:`` section, overridden by flags)."""

    min_test_accuracy: float = 0.0
    max_macro_f1_drop: float = 0.01
    max_class_f1_drop: float = 0.05
    min_export_agreement: float = 0.99

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"gate.{name} must be between 0 and 1, got {value}")


@dataclass(frozen=True)
class Check:
    """One gated figure: its values on both sides, the threshold, and whether it passed."""

    name: str  # what is checked, for people
    metric: str  # the metric as DVC names it (``test.macro_f1``, ``test.per_class.roses.f1``)
    baseline: float | None
    new: float | None
    threshold: str  # ``>= 0.9000`` or ``drop <= 0.0100``
    parameter: str  # the params key (and flag) that sets the threshold
    passed: bool
    note: str = ""

    def message(self) -> str:
        """One line naming the metric, the baseline value, the new value and the threshold."""
        verdict = "pass" if self.passed else "FAIL"
        text = (
            f"{verdict} {self.metric}: baseline {_value(self.baseline)}, new {_value(self.new)}, "
            f"threshold {self.threshold} ({self.parameter})"
        )
        return f"{text}; {self.note}" if self.note else text


def _value(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def dig(mapping: Any, dotted: str) -> Any:
    """``mapping['a']['b']`` for ``'a.b'``; None when a key is missing."""
    for key in dotted.split("."):
        if not isinstance(mapping, Mapping) or key not in mapping:
            return None
        mapping = mapping[key]
    return mapping


def _required(metrics: Mapping[str, Any], dotted: str, where: str) -> float:
    value = dig(metrics, dotted)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{where} has no number at '{dotted}'; re-run evaluate there (dvc repro evaluate)")
    return float(value)


def parse_metrics(text: str | None, *, path: str, where: str) -> dict[str, Any] | None:
    """A metrics file's JSON (``None`` when ``text`` is None: the file is absent)."""
    if text is None:
        return None
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} in {where} is not valid JSON ({error}); re-run the stage that writes it") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{path} in {where} is not a JSON mapping; re-run the stage that writes it")
    return parsed


def run_checks(
    *,
    new: Mapping[str, Any],
    baseline: Mapping[str, Any],
    thresholds: Thresholds,
    new_export: Mapping[str, Any] | None,
    baseline_export: Mapping[str, Any] | None = None,
    baseline_label: str = "the baseline",
) -> list[Check]:
    """Checks the workspace's evaluate (and export) metrics against the baseline's.

    Args:
        new: the workspace's metrics/evaluate.json.
        baseline: the baseline's metrics/evaluate.json.
        thresholds: what must hold.
        new_export: the workspace's metrics/export.json, or None when absent.
        baseline_export: the baseline's metrics/export.json (shown beside, never required).
        baseline_label: how messages name the baseline.

    Raises:
        ValueError: a gated metric is missing on either side (or the export's, when gated).
    """
    here = f"the workspace's {EVALUATE_METRICS}"
    there = f"{EVALUATE_METRICS} of {baseline_label}"
    accuracy = (_required(baseline, "test.accuracy", there), _required(new, "test.accuracy", here))
    macro_f1 = (_required(baseline, "test.macro_f1", there), _required(new, "test.macro_f1", here))
    checks = [
        Check(
            name="test accuracy floor",
            metric="test.accuracy",
            baseline=accuracy[0],
            new=accuracy[1],
            threshold=f">= {thresholds.min_test_accuracy:.4f}",
            parameter="gate.min_test_accuracy",
            passed=accuracy[1] >= thresholds.min_test_accuracy - TOLERANCE,
        ),
        _drop_check(
            "test macro-F1 drop", "test.macro_f1", macro_f1, thresholds.max_macro_f1_drop, "gate.max_macro_f1_drop"
        ),
        _class_check(baseline, new, thresholds.max_class_f1_drop),
    ]
    if thresholds.min_export_agreement > 0:
        checks.append(_export_check(new_export, baseline_export, thresholds.min_export_agreement))
    return checks


def _drop_check(name: str, metric: str, values: tuple[float, float], allowed: float, parameter: str) -> Check:
    before, after = values
    drop = before - after
    return Check(
        name=name,
        metric=metric,
        baseline=before,
        new=after,
        threshold=f"drop <= {allowed:.4f}",
        parameter=parameter,
        passed=drop <= allowed + TOLERANCE,
        note=f"fell by {drop:.4f}" if drop > allowed + TOLERANCE else "",
    )


def class_f1(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Test F1 per class name from an evaluate.json (empty when absent)."""
    per_class = dig(metrics, "test.per_class") or {}
    return {
        name: float(figures["f1"])
        for name, figures in per_class.items()
        if isinstance(figures, Mapping) and isinstance(figures.get("f1"), (int, float))
    }


def _class_check(baseline: Mapping[str, Any], new: Mapping[str, Any], allowed: float) -> Check:
    before, after = class_f1(baseline), class_f1(new)
    if not before or not after:
        side = "the baseline" if not before else "the workspace"
        raise ValueError(f"{EVALUATE_METRICS} of {side} has no test.per_class F1; re-run evaluate there")
    missing = sorted(set(before) - set(after))
    drops = {name: before[name] - after[name] for name in before if name in after}
    # The largest drop; among equal drops (an unchanged workspace) the class with the lowest F1 now.
    worst = max(drops, key=lambda name: (round(drops[name], 9), -after[name], name)) if drops else sorted(before)[0]
    note = ""
    if missing:
        note = f"class(es) missing from the workspace's metrics: {', '.join(missing)}"
    elif drops[worst] > allowed + TOLERANCE:
        failing = sorted(name for name, drop in drops.items() if drop > allowed + TOLERANCE)
        note = f"F1 fell by {drops[worst]:.4f} for '{worst}' (classes past the threshold: {', '.join(failing)})"
    return Check(
        name=f"worst class F1 drop ({worst})",
        metric=f"test.per_class.{worst}.f1",
        baseline=before[worst],
        new=after.get(worst),
        threshold=f"drop <= {allowed:.4f}",
        parameter="gate.max_class_f1_drop",
        passed=not missing and drops[worst] <= allowed + TOLERANCE,
        note=note,
    )


def export_agreement(report: Mapping[str, Any] | None) -> tuple[str, float] | None:
    """The exported format with the lowest agreement with evaluate, and that agreement (None: no formats)."""
    formats = dig(report, "formats") or {}
    values = {
        name: float(figures["agreement"])
        for name, figures in formats.items()
        if isinstance(figures, Mapping) and isinstance(figures.get("agreement"), (int, float))
    }
    if not values:
        return None
    lowest = min(values, key=lambda name: (values[name], name))
    return lowest, values[lowest]


def _export_check(new: Mapping[str, Any] | None, baseline: Mapping[str, Any] | None, minimum: float) -> Check:
    found = export_agreement(new)
    if found is None:
        raise ValueError(
            f"the workspace's {EXPORT_METRICS} is missing or lists no exported format; run the export stage "
            "(dvc repro export), or leave the export ungated with --min-export-agreement 0 (gate.min_export_agreement)"
        )
    name, agreement = found
    before = dict(dig(baseline, "formats") or {}).get(name, {})
    before_value = before.get("agreement") if isinstance(before, Mapping) else None
    return Check(
        name=f"export agreement ({name})",
        metric=f"formats.{name}.agreement",
        baseline=float(before_value) if isinstance(before_value, (int, float)) else None,
        new=agreement,
        threshold=f">= {minimum:.4f}",
        parameter="gate.min_export_agreement",
        passed=agreement >= minimum - TOLERANCE,
    )


# ---------------------------------------------------------------- report


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _delta(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return "-"
    change = after - before
    return "0" if abs(change) < TOLERANCE else f"{change:+.4f}"


def checks_table(checks: Sequence[Check]) -> str:
    """The checks as a Markdown table."""
    lines = [
        "| check | metric | baseline | this change | change | threshold | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for check in checks:
        result = "pass" if check.passed else f"**FAIL**{': ' + _cell(check.note) if check.note else ''}"
        lines.append(
            f"| {_cell(check.name)} | `{check.metric}` | {_value(check.baseline)} | {_value(check.new)} | "
            f"{_delta(check.baseline, check.new)} | {check.threshold} (`{check.parameter}`) | {result} |"
        )
    return "\n".join(lines)


def headline_table(baseline: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """The headline metrics of metrics/evaluate.json on both sides, changed or not."""
    lines = ["| metric | baseline | this change | change |", "|---|---|---|---|"]
    for metric in HEADLINE:
        before, after = _number(dig(baseline, metric)), _number(dig(new, metric))
        if before is None and after is None:
            continue
        lines.append(f"| `{metric}` | {_value(before)} | {_value(after)} | {_delta(before, after)} |")
    return "\n".join(lines)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def per_class_table(baseline: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """Test precision, recall and F1 per class on both sides, with the F1 change."""
    before, after = dig(baseline, "test.per_class") or {}, dig(new, "test.per_class") or {}
    lines = [
        "| class | F1 baseline | F1 this change | F1 change | recall baseline | recall this change | support |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in sorted(set(before) | set(after)):
        old, current = before.get(name) or {}, after.get(name) or {}
        lines.append(
            f"| {_cell(name)} | {_value(_number(old.get('f1')))} | {_value(_number(current.get('f1')))} | "
            f"{_delta(_number(old.get('f1')), _number(current.get('f1')))} | "
            f"{_value(_number(old.get('recall')))} | {_value(_number(current.get('recall')))} | "
            f"{current.get('support', old.get('support', '-'))} |"
        )
    return "\n".join(lines)


def split_metrics_diff(diff: Mapping[str, Any]) -> tuple[list[tuple], list[tuple]]:
    """``dvc metrics diff --json`` rows (path, metric, old, new, change), model figures apart from machine ones."""
    model, machine = [], []
    for path, metrics in sorted(diff.items()):
        for metric, values in sorted((metrics or {}).items()):
            if not isinstance(values, Mapping):
                continue
            row = (path, metric, values.get("old"), values.get("new"), values.get("diff"))
            (machine if MACHINE_DEPENDENT.search(metric) else model).append(row)
    return model, machine


def metrics_diff_table(rows: Sequence[tuple]) -> str:
    """Rows of :func:`split_metrics_diff` as Markdown (the columns of ``dvc metrics diff --md``)."""
    if not rows:
        return "No changes."
    lines = ["| Path | Metric | baseline | workspace | Change |", "|---|---|---|---|---|"]
    for path, metric, old, new, change in rows:
        lines.append(f"| {path} | {metric} | {_shown(old)} | {_shown(new)} | {_shown(change)} |")
    return "\n".join(lines)


def _shown(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return _cell(value)


def dvc_output(dvc: str, arguments: Sequence[str], *, cwd: Path | None = None) -> tuple[str | None, str]:
    """Runs ``dvc ARGUMENTS``; (stdout, "") on success, (None, why) when it failed or DVC is absent."""
    try:
        result = subprocess.run([dvc, *arguments], cwd=cwd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, str(error)
    if result.returncode != 0:
        output = (result.stderr.strip() or result.stdout.strip()).splitlines()
        return None, output[-1] if output else f"`dvc {' '.join(arguments)}` exited {result.returncode}"
    return result.stdout, ""


@dataclass(frozen=True)
class ReportParts:
    """Everything the Markdown report shows, gathered by the command."""

    baseline_label: str
    checks: list[Check]
    baseline_metrics: Mapping[str, Any]
    new_metrics: Mapping[str, Any]
    error_diff: str  # Markdown body, or why it is unavailable
    error_files: Sequence[str] = ()
    metrics_diff: Mapping[str, Any] | None = None
    metrics_diff_problem: str = ""
    params_diff: str | None = None
    params_diff_problem: str = ""


def passed(checks: Sequence[Check]) -> bool:
    """Whether every check passed."""
    return all(check.passed for check in checks)


def markdown_report(parts: ReportParts) -> str:
    """The gate's Markdown report (see the module docstring for its sections)."""
    verdict = "passed" if passed(parts.checks) else "FAILED"
    failing = [check for check in parts.checks if not check.passed]
    lines = [
        f"## transferlab gate: {verdict}",
        "",
        f"Baseline: {parts.baseline_label}; this change: the workspace."
        + (f" Failing: {', '.join(f'`{check.metric}`' for check in failing)}." if failing else ""),
        "",
        "### Checks",
        "",
        checks_table(parts.checks),
        "",
        "### Headline metrics (shown whether changed or not)",
        "",
        headline_table(parts.baseline_metrics, parts.new_metrics),
        "",
        "### Per-class test figures",
        "",
        per_class_table(parts.baseline_metrics, parts.new_metrics),
        "",
        "### Errors: fixed and introduced",
        "",
        parts.error_diff,
    ]
    if parts.error_files:
        lines += ["", "Files: " + ", ".join(f"`{name}`" for name in parts.error_files)]
    model, machine = split_metrics_diff(parts.metrics_diff or {})
    lines += ["", "### `dvc metrics diff` (model figures)", ""]
    lines.append(
        metrics_diff_table(model) if parts.metrics_diff is not None else f"Unavailable: {parts.metrics_diff_problem}"
    )
    lines += ["", "### `dvc params diff`", ""]
    if parts.params_diff is not None:
        table = [line for line in parts.params_diff.strip().splitlines() if line.startswith("|")]
        lines.append(parts.params_diff.strip() if len(table) > 2 else "No changes.")  # header and rule only
    else:
        lines.append(f"Unavailable: {parts.params_diff_problem}")
    lines += [
        "",
        "### Machine-dependent figures (timing, cache): not gated",
        "",
        "These depend on the machine, its load and what the embedding cache held, not on the model.",
        "",
        metrics_diff_table(machine) if parts.metrics_diff is not None else "Unavailable.",
        "",
    ]
    return "\n".join(lines)
