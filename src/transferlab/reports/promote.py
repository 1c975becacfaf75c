"""Promoting an experiment: rank ``dvc exp show --json`` by a metric, apply the winner, maybe branch it.

DVC has no "checkout the best experiment" (dvc#4283, open since 2020); its own example ranks
with ``dvc exp show --csv | tail | cut``. Here experiments are ranked by any metric of their
metrics files (``test.accuracy``, or ``metrics/evaluate.json:val.macro_f1`` to name the file),
best first; ties go to the cheaper extraction (ms per image, as the leaderboard of
``transferlab compare`` computes it), then to the name. Experiments without the metric (failed
or unfinished) are left out.

Applying is ``dvc exp apply``, which overwrites params.yaml and dvc.lock in the workspace, so it is
refused while either has uncommitted changes (:func:`uncommitted`): those would be lost silently.
"""

from __future__ import annotations

import math
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferlab.reports import compare

# Where a bare metric name is looked up first; then every other metrics file, in name order.
DEFAULT_METRICS_FILE = "metrics/evaluate.json"
GUARDED_FILES = ("params.yaml", "dvc.lock")


@dataclass(frozen=True)
class Candidate:
    """One finished experiment, with the value it is ranked by."""

    name: str
    rev: str
    value: float | None
    milliseconds_per_image: float | None
    backbone: str


def metric_value(data: Mapping[str, Any], metric: str) -> float | None:
    """The metric's value in an experiment's ``data`` from ``dvc exp show --json`` (None if absent).

    Args:
        data: the experiment's ``data`` (with ``metrics``: path -> {"data": {...}}).
        metric: ``dotted.key`` (metrics/evaluate.json first, then the other files) or ``path:dotted.key``.
    """
    files = {path: (content or {}).get("data") or {} for path, content in (data.get("metrics") or {}).items()}
    if ":" in metric:
        path, key = metric.split(":", 1)
        order = [path]
    else:
        key = metric
        order = [DEFAULT_METRICS_FILE, *sorted(path for path in files if path != DEFAULT_METRICS_FILE)]
    for path in order:
        value = compare._dig(files.get(path), *key.split("."))
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def candidates(exp_show: Sequence[Mapping[str, Any]], metric: str) -> list[Candidate]:
    """Every named experiment in ``dvc exp show --json`` output, with its metric value (None if absent)."""
    found = []
    for baseline in exp_show:
        for group in baseline.get("experiments") or []:
            for revision in group.get("revs") or []:
                name, data = revision.get("name"), revision.get("data") or {}
                if not name:
                    continue
                metrics = {
                    path: (content or {}).get("data") or {} for path, content in (data.get("metrics") or {}).items()
                }
                extract = metrics.get("metrics/extract_features.json", {})
                found.append(
                    Candidate(
                        name=name,
                        rev=str(revision.get("rev") or data.get("rev") or ""),
                        value=metric_value(data, metric),
                        milliseconds_per_image=compare.extraction_cost(extract),
                        backbone=extract.get("stack") or "?",
                    )
                )
    return found


def rank(found: Sequence[Candidate], *, lowest_first: bool = False) -> list[Candidate]:
    """Experiments that have the metric, best first; ties by extraction cost (cheaper first), then name."""
    ranked = [candidate for candidate in found if candidate.value is not None]
    sign = 1.0 if lowest_first else -1.0
    return sorted(
        ranked,
        key=lambda candidate: (
            sign * candidate.value,
            candidate.milliseconds_per_image if candidate.milliseconds_per_image is not None else math.inf,
            candidate.name,
        ),
    )


def format_leaderboard(ranked: Sequence[Candidate], metric: str, *, chosen: str, top: int) -> str:
    """The top of the ranking as text; the chosen experiment is marked (and shown even below the top)."""
    header = f"{'#':>3}  {metric[:28]:>28} {'ms/img':>8}  {'backbone':<36} experiment"
    lines = [header, "-" * len(header)]
    for position, candidate in enumerate(ranked, 1):
        if position > top and candidate.name != chosen:
            continue
        cost = f"{candidate.milliseconds_per_image:8.2f}" if candidate.milliseconds_per_image else f"{'?':>8}"
        marker = "  <- promoted" if candidate.name == chosen else ""
        lines.append(
            f"{position:>3}  {candidate.value:>28.4f} {cost}  {candidate.backbone[:36]:<36} {candidate.name}{marker}"
        )
    if len(ranked) > top:
        lines.append(f"     ({len(ranked) - top} more)")
    return "\n".join(lines)


def choose(ranked: Sequence[Candidate], found: Sequence[Candidate], name: str | None, metric: str) -> Candidate:
    """The named experiment, or the best ranked one.

    Raises:
        ValueError: no experiment has the metric, or the named one does not exist.
    """
    if name is not None:
        for candidate in found:
            if candidate.name == name:
                return candidate
        known = ", ".join(sorted(candidate.name for candidate in found)) or "none"
        raise ValueError(f"no experiment named '{name}' for this commit; experiments: {known} (see `dvc exp show`)")
    if not ranked:
        raise ValueError(
            f"no experiment of this commit has the metric '{metric}'; run some (`transferlab compare`, "
            "`dvc exp run`) or name a metric they report, e.g. test.accuracy or metrics/evaluate.json:val.macro_f1"
        )
    return ranked[0]


def uncommitted(cwd: Path | None = None) -> list[str]:
    """Which of params.yaml and dvc.lock have uncommitted changes (``git status``)."""
    result = subprocess.run(
        ["git", "status", "--porcelain", "--", *GUARDED_FILES], cwd=cwd, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise ValueError(f"`git status` failed ({result.stderr.strip()}); run this from the project's root")
    return sorted({line[3:].strip() for line in result.stdout.splitlines() if line.strip()})


def refuse_if_uncommitted(cwd: Path | None = None) -> None:
    """Raises ``ValueError`` naming params.yaml / dvc.lock when either has changes `dvc exp apply` would lose."""
    changed = uncommitted(cwd)
    if changed:
        raise ValueError(
            f"{' and '.join(changed)} {'has' if len(changed) == 1 else 'have'} uncommitted changes that "
            "`dvc exp apply` would overwrite; commit them (git commit) or save them as an experiment "
            "(dvc exp save) first, then promote again"
        )
