"""The CSV files passed between stages: each table's columns, its reader and its writer, side by side.

One module holds every table contract (docs/DESIGN.md describes them), so a column added or
renamed changes here once and the stage that writes a table and the stages that read it cannot
drift apart:

- the index, ``data/raw/index.csv`` (download writes it, split reads it);
- the splits, ``data/splits/{train,val,test}.csv`` (split writes them; augment reads train,
  extract_features reads val and test);
- the recipes, ``data/augmented/train.csv`` (augment writes it, extract_features reads it);
- the test predictions, ``metrics/evaluate/test_predictions.csv`` (evaluate writes it, export
  checks its model against it, ``transferlab gate`` diffs it with a baseline's);
- the error diff, ``<gate folder>/error_diff.csv`` (``transferlab gate`` and ``error-diff`` write it);
- the suspected label errors, ``metrics/label_issues.csv`` (``transferlab label-issues`` writes it,
  the user copies confirmed rows' sha256 into ``split.exclude``).

Writers are atomic (a file is complete or absent) and write ``\\n`` line ends in UTF-8. Readers
raise ``ValueError`` naming the stage to run when a file or a column is missing.

Memory: the ``read_*`` functions return every row as a dict (about 0.7 KB per index row), which is
fine for the test predictions or a label-issue list but not for a dataset of 10^6 images. The
stages that pass whole datasets (download, split, augment) stream instead: writers take any
iterable (a generator is consumed row by row), and :func:`stream_index` / :func:`stream_split`
return a :class:`TableRows`, which checks the file now and reads it one row at a time on each
iteration, so a stage can pass over it twice without holding it.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from transferlab.core import atomic

SPLIT_COLUMNS = ("path", "label", "sha256")
RECIPE_COLUMNS = (*SPLIT_COLUMNS, "recipe")
PREDICTION_COLUMNS = ("path", "sha256", "actual", "predicted", "confidence")
# What export needs of the predictions: ``actual`` is for people reading the file.
PREDICTION_REQUIRED_COLUMNS = ("path", "sha256", "predicted", "confidence")
# The error diff: one row per test image whose prediction is wrong in the baseline, the change, or both.
ERROR_DIFF_COLUMNS = (
    "kind",  # fixed, newly_wrong, wrong_in_both
    "path",
    "sha256",
    "actual",
    "baseline_predicted",
    "baseline_confidence",
    "predicted",
    "confidence",
)
# Suspected label errors, most suspicious first; score = cleanlab's label quality (0..1, low = suspicious).
LABEL_ISSUE_COLUMNS = ("rank", "path", "split", "sha256", "given_label", "suggested_label", "score")


@dataclasses.dataclass(frozen=True)
class IndexRow:
    """One row of ``data/raw/index.csv``; its fields, in order, are the columns (:data:`INDEX_COLUMNS`)."""

    path: str  # POSIX path relative to the images folder
    label: str  # class folder name
    sha256: str  # of the file's bytes; empty when the file was not read (a link)
    width: int | None  # after EXIF orientation; None when not decoded
    height: int | None
    status: str  # ok, corrupt, not-an-image, too-small, too-large, link
    detail: str  # why it is not ok (empty for ok)

    def as_csv(self) -> dict[str, str]:
        """The row as strings, sizes empty when unknown."""
        row = dataclasses.asdict(self)
        row["width"] = "" if self.width is None else str(self.width)
        row["height"] = "" if self.height is None else str(self.height)
        return row


INDEX_COLUMNS = tuple(field.name for field in dataclasses.fields(IndexRow))
# The index columns the split stage uses; the others describe excluded files to people.
INDEX_REQUIRED_COLUMNS = ("path", "label", "sha256", "status")


# ------------------------------------------------------------------------------ index


def write_index(rows: Iterable[IndexRow], path: str | os.PathLike) -> None:
    """Writes ``data/raw/index.csv`` atomically (columns :data:`INDEX_COLUMNS`, rows in given order)."""
    _write(path, INDEX_COLUMNS, (row.as_csv() for row in rows))


def read_index(path: str | os.PathLike) -> list[dict[str, str]]:
    """Reads the download stage's index as dicts of strings (all rows in memory; see :func:`stream_index`).

    Raises:
        ValueError: the file is missing (run download) or lacks a column of :data:`INDEX_REQUIRED_COLUMNS`.
    """
    return list(stream_index(path))


def stream_index(path: str | os.PathLike) -> TableRows:
    """The download stage's index, checked now and read one row at a time on each iteration.

    Raises:
        ValueError: the file is missing (run download) or lacks a column of :data:`INDEX_REQUIRED_COLUMNS`.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"index {path} not found; run the download stage first (dvc repro download)")
    return TableRows(path, INDEX_REQUIRED_COLUMNS, rerun="re-run the download stage to rebuild it", name="index ")


# ------------------------------------------------------------------------------ splits


def write_splits(splits: Mapping[str, Iterable[Mapping[str, Any]]], folder: str | os.PathLike) -> None:
    """Writes ``<name>.csv`` for each split into ``folder`` (columns :data:`SPLIT_COLUMNS`), all or none.

    Args:
        splits: rows by split name (``train``, ``val``, ``test``), each row with at least the columns;
            each split's rows may be a generator (consumed one row at a time).
        folder: the splits folder; it is replaced as a whole once every file is written.
    """
    with atomic.atomic_directory(folder) as temporary:
        for name, rows in splits.items():
            _write_rows(temporary / f"{name}.csv", SPLIT_COLUMNS, rows)


def write_routed_splits(
    rows: Iterable[tuple[str, Mapping[str, Any]]], names: Sequence[str], folder: str | os.PathLike
) -> None:
    """Writes ``<name>.csv`` for each of ``names`` into ``folder`` in one pass over ``(name, row)`` pairs, all or none.

    As :func:`write_splits`, for rows that come mixed (the split stage's one pass over the index):
    every file is open at once and each row goes to its split's file, in the order given.
    """
    with atomic.atomic_directory(folder) as temporary, contextlib.ExitStack() as files:
        writers = {}
        for name in names:
            handle = files.enter_context((temporary / f"{name}.csv").open("w", newline="", encoding="utf-8"))
            writers[name] = csv.DictWriter(handle, fieldnames=SPLIT_COLUMNS, lineterminator="\n")
            writers[name].writeheader()
        for name, row in rows:
            writers[name].writerow(row)


def read_split(path: str | os.PathLike) -> list[dict[str, str]]:
    """Reads a split CSV that must hold images, every row in memory (see :func:`stream_split`).

    Raises:
        ValueError: the file is missing (run split), lacks a column, or has no rows.
    """
    return list(stream_split(path))


def stream_split(path: str | os.PathLike) -> TableRows:
    """A split CSV that must hold images, checked now and read one row at a time on each iteration.

    augment reads the training split with it.

    Raises:
        ValueError: the file is missing (run split), lacks a column, or has no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path.stem} split {path} not found; run the split stage first (dvc repro split)")
    rows = TableRows(path, SPLIT_COLUMNS, rerun="re-run the split stage to rebuild it")
    if next(iter(rows), None) is None:
        raise ValueError(f"{path} has no images; check the split stage's metrics/split.json")
    return rows


def in_path_order(rows: Iterable[Mapping[str, Any]]) -> Iterable[Mapping[str, Any]]:
    """``rows`` sorted by ``path`` (stable), without holding them when they already are.

    A re-iterable ``rows`` (a :class:`TableRows` or a list) that is already in path order (split
    and download write their tables so) is returned as it is, after one pass that compares each
    path with the one before; otherwise the rows are read into a list and sorted.
    """
    if iter(rows) is not rows:  # re-iterable: one pass checks the order
        previous = None
        for row in rows:
            path = str(row["path"])
            if previous is not None and path < previous:
                break
            previous = path
        else:
            return rows
    return sorted(rows, key=lambda row: str(row["path"]))


# ------------------------------------------------------------------------------ recipes


def write_recipes(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> int:
    """Writes ``data/augmented/train.csv`` atomically (columns :data:`RECIPE_COLUMNS`, rows in given order).

    Returns:
        The number of rows written (``rows`` may be a generator, consumed one row at a time).
    """
    return _write(path, RECIPE_COLUMNS, rows)


def read_views(path: str | os.PathLike) -> list[dict[str, str]]:
    """Reads the rows extract_features embeds: the recipes CSV (train) or a split CSV (val, test).

    Every row gets a ``recipe``: the file's, or ``""`` (the original) where a split CSV has none.

    Raises:
        ValueError: the file is missing or lacks a column of :data:`SPLIT_COLUMNS` (run split and augment).
    """
    rows = list(stream_views(path))
    for row in rows:
        row["recipe"] = row.get("recipe") or ""
    return rows


def stream_views(path: str | os.PathLike) -> TableRows:
    """:func:`read_views`' rows, checked now and read one at a time on each iteration (``recipe`` may be absent).

    Raises:
        ValueError: as :func:`read_views`.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} not found; run the split and augment stages first (dvc repro augment)")
    return TableRows(path, SPLIT_COLUMNS, rerun="re-run the split and augment stages (dvc repro augment)")


# ------------------------------------------------------------------------------ test predictions


def write_predictions(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Writes prediction rows as CSV (columns :data:`PREDICTION_COLUMNS`, confidence to 6 decimals), atomically."""
    _write(path, PREDICTION_COLUMNS, ({**row, "confidence": f"{row['confidence']:.6f}"} for row in rows))


def read_predictions(path: str | os.PathLike) -> list[dict[str, str]]:
    """Reads evaluate's test_predictions.csv (path, sha256, actual, predicted, confidence).

    Raises:
        ValueError: the file is missing (run evaluate), lacks a column of
            :data:`PREDICTION_REQUIRED_COLUMNS`, or has no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} not found; run the evaluate stage first (dvc repro evaluate)")
    rows = _read(path, PREDICTION_REQUIRED_COLUMNS, rerun="re-run evaluate")
    if not rows:
        raise ValueError(f"{path} has no rows; evaluate needs test images (split.test_fraction > 0)")
    return rows


# ------------------------------------------------------------------------------ error diff


def write_error_diff(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Writes the error diff CSV atomically (columns :data:`ERROR_DIFF_COLUMNS`, confidences to 6 decimals)."""
    _write(
        path,
        ERROR_DIFF_COLUMNS,
        (
            {
                **row,
                "confidence": f"{row['confidence']:.6f}",
                "baseline_confidence": f"{row['baseline_confidence']:.6f}",
            }
            for row in rows
        ),
    )


def read_error_diff(path: str | os.PathLike) -> list[dict[str, str]]:
    """Reads an error diff CSV (:data:`ERROR_DIFF_COLUMNS`); raises ``ValueError`` when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} not found; run `transferlab error-diff --baseline REV` first")
    return _read(path, ERROR_DIFF_COLUMNS, rerun="run `transferlab error-diff` again")


# ------------------------------------------------------------------------------ label issues


def write_label_issues(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Writes metrics/label_issues.csv atomically (columns :data:`LABEL_ISSUE_COLUMNS`, score to 6 decimals)."""
    _write(path, LABEL_ISSUE_COLUMNS, ({**row, "score": f"{row['score']:.6f}"} for row in rows))


def read_label_issues(path: str | os.PathLike) -> list[dict[str, str]]:
    """Reads metrics/label_issues.csv; raises ``ValueError`` when it is missing (run the command)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} not found; run `transferlab label-issues` first")
    return _read(path, LABEL_ISSUE_COLUMNS, rerun="run `transferlab label-issues` again")


# ------------------------------------------------------------------------------ shared


class TableRows:
    """A CSV table whose header is checked once, then read lazily: each iteration opens the file again.

    Iterating yields each row as a dict of strings, one at a time, so a pass over the table holds
    one row; iterating again gives the same rows in the same order (the file is not expected to
    change meanwhile: the stages read their inputs, never the files they write).
    """

    def __init__(self, path: Path, required: Sequence[str], *, rerun: str, name: str = "") -> None:
        """Checks that ``path``'s header has the ``required`` columns (``rerun`` says what to do if not)."""
        self.path = path
        with path.open(newline="", encoding="utf-8") as handle:
            columns = csv.DictReader(handle).fieldnames or []
        missing = [column for column in required if column not in columns]
        if missing:
            raise ValueError(
                f"{name}{path} lacks column(s) {', '.join(missing)} (has: {', '.join(columns) or 'nothing'}); {rerun}"
            )

    def __iter__(self) -> Iterator[dict[str, str]]:
        with self.path.open(newline="", encoding="utf-8") as handle:
            yield from csv.DictReader(handle)


def _read(path: Path, required: Sequence[str], *, rerun: str, name: str = "") -> list[dict[str, str]]:
    """Reads a CSV into dicts after checking that its header has the ``required`` columns."""
    return list(TableRows(path, required, rerun=rerun, name=name))


def _write(path: str | os.PathLike, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> int:
    with atomic.atomic_path(path) as temporary:
        return _write_rows(temporary, columns, rows)


def _write_rows(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> int:
    """Writes the header and ``rows`` (any iterable, consumed one row at a time); returns the row count."""
    count = 0
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for count, row in enumerate(rows, start=1):  # noqa: B007 (the count is the point)
            writer.writerow(row)
    return count
