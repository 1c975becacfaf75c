"""The error diff: which test images a change fixed, which it broke, and which stay wrong.

Two test predictions files (evaluate's ``test_predictions.csv``, read with
:mod:`transferlab.data.tables`), one from a baseline and one from the workspace, are matched by
image **sha256**, never by path: a renamed or moved photo is the same test image, and a path
reused for other bytes is not. Each side's correctness is judged against its own ``actual``
label (a relabelled image is counted apart, so a fixed label is not taken for a fixed model).

Images in only one of the two files (the test split changed) are counted, not diffed. The result
is a CSV (:func:`transferlab.data.tables.write_error_diff`), a thumbnail gallery grouped by kind
(drawn by :mod:`transferlab.reports.gallery`), and a Markdown section for the gate's report.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transferlab.data import tables
from transferlab.reports import baseline as baseline_module
from transferlab.reports import gallery

KINDS = ("fixed", "newly_wrong", "wrong_in_both")
HEADINGS = {
    "fixed": "Fixed: wrong in the baseline, right now",
    "newly_wrong": "Newly wrong: right in the baseline, wrong now",
    "wrong_in_both": "Wrong in both",
}
COLOURS = {"fixed": "#1b7a1b", "newly_wrong": "#b00020", "wrong_in_both": "#a35c00"}


@dataclass(frozen=True)
class Change:
    """One test image whose prediction is wrong on at least one side."""

    kind: str  # one of KINDS
    path: str  # the workspace's path (the baseline's may differ: matched by sha256)
    sha256: str
    actual: str
    baseline_predicted: str
    baseline_confidence: float
    predicted: str
    confidence: float


@dataclass(frozen=True)
class ErrorDiff:
    """The changes by kind, most confident first, and how the two files matched."""

    fixed: list[Change] = field(default_factory=list)
    newly_wrong: list[Change] = field(default_factory=list)
    wrong_in_both: list[Change] = field(default_factory=list)
    matched: int = 0  # distinct images in both files
    only_in_baseline: int = 0
    only_in_new: int = 0
    relabelled: int = 0  # matched images whose label differs between the two (not diffed)

    def by_kind(self) -> dict[str, list[Change]]:
        """The three lists, keyed by kind, in :data:`KINDS` order."""
        return {"fixed": self.fixed, "newly_wrong": self.newly_wrong, "wrong_in_both": self.wrong_in_both}

    def rows(self) -> list[dict]:
        """Every change as a CSV row (:data:`transferlab.data.tables.ERROR_DIFF_COLUMNS`), grouped by kind."""
        return [asdict(change) for kind in KINDS for change in self.by_kind()[kind]]

    def counts(self) -> dict[str, int]:
        """How many of each kind, and how the files matched (JSON-ready)."""
        return {kind: len(changes) for kind, changes in self.by_kind().items()} | {
            "matched": self.matched,
            "only_in_baseline": self.only_in_baseline,
            "only_in_new": self.only_in_new,
            "relabelled": self.relabelled,
        }


def _by_sha256(rows: Sequence[Mapping[str, str]], side: str) -> dict[str, Mapping[str, str]]:
    # Byte-identical copies in one class share a split and a prediction: the first path stands for them.
    table: dict[str, Mapping[str, str]] = {}
    for row in sorted(rows, key=lambda row: row["path"]):
        if not row.get("sha256"):
            raise ValueError(f"the {side} test predictions have a row without sha256 ({row['path']}); re-run evaluate")
        if "actual" not in row:
            raise ValueError(f"the {side} test predictions lack the 'actual' column; re-run evaluate")
        table.setdefault(row["sha256"], row)
    return table


def diff_predictions(baseline: Sequence[Mapping[str, str]], new: Sequence[Mapping[str, str]]) -> ErrorDiff:
    """Matches two test predictions files by sha256 and sorts the wrong ones into the three kinds.

    Args:
        baseline: the baseline's rows (path, sha256, actual, predicted, confidence as strings).
        new: the workspace's rows, same columns.

    Returns:
        The diff; each kind sorted by the confidence of the side that is wrong (most confident first).

    Raises:
        ValueError: a row lacks its sha256 or the ``actual`` column.
    """
    old, current = _by_sha256(baseline, "baseline"), _by_sha256(new, "workspace")
    shared = sorted(set(old) & set(current))
    kinds: dict[str, list[Change]] = {kind: [] for kind in KINDS}
    relabelled = 0
    for sha in shared:
        before, after = old[sha], current[sha]
        if before["actual"] != after["actual"]:
            relabelled += 1
            continue
        was_wrong, is_wrong = before["predicted"] != before["actual"], after["predicted"] != after["actual"]
        if not (was_wrong or is_wrong):
            continue
        kind = "wrong_in_both" if was_wrong and is_wrong else "fixed" if was_wrong else "newly_wrong"
        kinds[kind].append(
            Change(
                kind=kind,
                path=after["path"],
                sha256=sha,
                actual=after["actual"],
                baseline_predicted=before["predicted"],
                baseline_confidence=float(before["confidence"]),
                predicted=after["predicted"],
                confidence=float(after["confidence"]),
            )
        )
    kinds["fixed"].sort(key=lambda change: (-change.baseline_confidence, change.path))
    kinds["newly_wrong"].sort(key=lambda change: (-change.confidence, change.path))
    kinds["wrong_in_both"].sort(key=lambda change: (-change.confidence, change.path))
    return ErrorDiff(
        **kinds,
        matched=len(shared),
        only_in_baseline=len(set(old) - set(current)),
        only_in_new=len(set(current) - set(old)),
        relabelled=relabelled,
    )


def _tile(change: Change) -> gallery.Tile:
    return gallery.Tile(
        path=change.path,
        title=(
            f"was {change.baseline_predicted} ({change.baseline_confidence:.0%}), "
            f"now {change.predicted} ({change.confidence:.0%})\ntrue {change.actual}"
        ),
        colour=COLOURS[change.kind],
    )


def render(
    diff: ErrorDiff,
    *,
    images_directory: str | os.PathLike,
    path: str | os.PathLike,
    baseline_label: str,
    max_image_pixels: int,
    per_kind: int = 8,
) -> None:
    """Draws the diff as a PNG: one titled group per kind, its ``per_kind`` most confident images.

    Args:
        diff: the error diff (:func:`diff_predictions`).
        images_directory: the workspace's data/raw/images (the changes' paths are relative to it).
        path: the PNG to write (atomically).
        baseline_label: how to name the baseline in the title.
        max_image_pixels: decompression-bomb limit (params ``download.max_image_pixels``).
        per_kind: most thumbnails per kind.
    """
    groups = [
        (f"{HEADINGS[kind]} ({len(changes)})", [_tile(change) for change in changes[:per_kind]])
        for kind, changes in diff.by_kind().items()
    ]
    gallery.render_tile_groups(
        groups,
        images_directory=images_directory,
        path=path,
        title=f"Test errors: the workspace against {baseline_label}\n({diff.matched} test images matched by sha256)",
        max_image_pixels=max_image_pixels,
        empty_text="none",
    )


def markdown(diff: ErrorDiff, *, limit: int = 10) -> str:
    """The diff as a Markdown section body: the counts, then up to ``limit`` images of each kind."""
    counts = diff.counts()
    lines = [
        f"{counts['fixed']} fixed, {counts['newly_wrong']} newly wrong, {counts['wrong_in_both']} wrong in both, "
        f"of {diff.matched} test images matched by sha256."
    ]
    unmatched = [
        f"{counts[key]} {text}"
        for key, text in (
            ("only_in_baseline", "only in the baseline's test split"),
            ("only_in_new", "only in this change's test split"),
            ("relabelled", "relabelled (not diffed)"),
        )
        if counts[key]
    ]
    if unmatched:
        lines.append(f"Not compared: {', '.join(unmatched)}.")
    for kind, changes in diff.by_kind().items():
        if not changes:
            continue
        lines += ["", f"**{HEADINGS[kind]}** ({len(changes)})", ""]
        lines += ["| image | true | baseline | this change |", "|---|---|---|---|"]
        for change in changes[:limit]:
            lines.append(
                f"| `{_cell(change.path)}` | {_cell(change.actual)} | "
                f"{_cell(change.baseline_predicted)} ({change.baseline_confidence:.2f}) | "
                f"{_cell(change.predicted)} ({change.confidence:.2f}) |"
            )
        if len(changes) > limit:
            lines.append(f"| ... {len(changes) - limit} more in the CSV | | | |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def against_baseline(
    baseline: baseline_module.Baseline,
    *,
    predictions: str | os.PathLike,
    baseline_predictions: str,
    images_directory: str | os.PathLike,
    out: str | os.PathLike,
    max_image_pixels: int,
    cwd: Path | None = None,
) -> tuple[ErrorDiff, list[Path]]:
    """Diffs the workspace's test predictions with the baseline's; writes the CSV and the PNG into ``out``.

    Args:
        baseline: the resolved baseline (a revision or an experiment).
        predictions: the workspace's test_predictions.csv.
        baseline_predictions: the same file's path inside the baseline's commit.
        images_directory: the workspace's data/raw/images, for the thumbnails.
        out: the folder for ``error_diff.csv`` and ``error_diff.png`` (created).
        max_image_pixels: decompression-bomb limit (params ``download.max_image_pixels``).
        cwd: the project root (default: the current directory).

    Raises:
        ValueError: either predictions file is missing or malformed (the message names it).
    """
    new_rows = tables.read_predictions(predictions)
    text = baseline_module.read_text(baseline, baseline_predictions, cwd=cwd)
    if text is None:
        raise ValueError(
            f"{baseline_predictions} is not in {baseline.label}: was evaluate run and its outputs committed there?"
        )
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / f"{baseline.commit[:8]}-test_predictions.csv"
        copy.write_text(text, encoding="utf-8")
        old_rows = tables.read_predictions(copy)
    diff = diff_predictions(old_rows, new_rows)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "error_diff.csv", out / "error_diff.png"]
    tables.write_error_diff(diff.rows(), written[0])
    render(
        diff,
        images_directory=images_directory,
        path=written[1],
        baseline_label=baseline.label,
        max_image_pixels=max_image_pixels,
    )
    return diff, written
