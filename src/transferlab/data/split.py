"""The split stage's logic: a duplicate-aware, stratified, seeded train/val/test split.

How an index becomes three splits:

1. Only rows with ``status == "ok"`` are used; the others are counted by status in the report.
2. **Label conflicts are dropped.** When the same bytes (the same ``sha256``) appear under two or
   more labels, nobody can say which label is right, and keeping them would put one photo in
   two classes (or in train and test at once). Every copy of such an image is removed from every
   split and listed under ``label_conflicts`` in the report. flower_photos has one: a photo that
   is in both ``roses/`` and ``tulips/``. To keep it, delete the wrong copy from the dataset.
3. **Byte-identical copies within one class form a group** that always lands in one split, so
   no test image has a twin in train.
4. **Each class is split on its own** (stratified). Its groups are ranked by a keyed hash,
   ``sha256(f"{seed}:{group sha256}")``; the first groups go to test, the next to val and the
   rest to train. The ranking depends on the seed and the image bytes only, never on paths,
   the order of rows or the file system, and an image added later slots into the ranking
   without reshuffling the others, so most earlier assignments survive a grown dataset.
5. Each held-out split of a class takes the prefix of groups whose image count is closest to
   ``round(n * fraction)`` (rounding half up), and at least one image when its fraction is
   above 0. Without duplicate groups this is within one image of the target.
6. ``max_images_per_class`` (0 = no cap) keeps, before splitting, the first groups of each
   class in the same hash order that still fit under the cap.
7. ``exclude`` (params ``split.exclude``) drops images before anything else: an entry of 64
   hexadecimal characters drops every file with those bytes, any other entry the file at that
   path. Confirmed label errors (``transferlab label-issues``) go there, versioned with the
   params; the report lists every excluded file, and entries that matched nothing (a typo, or
   an image since removed) under ``exclude_unmatched``.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from transferlab.data import tables

SPLIT_NAMES = ("train", "val", "test")
Groups = list[list[dict[str, str]]]  # a class's groups of byte-identical rows, in rank order


@dataclasses.dataclass(frozen=True)
class SplitResult:
    """Three splits (rows with ``path``, ``label``, ``sha256``; sorted by path) and the report."""

    train: list[dict[str, str]]
    val: list[dict[str, str]]
    test: list[dict[str, str]]
    report: dict[str, Any]

    def splits(self) -> dict[str, list[dict[str, str]]]:
        """The three splits by name, in ``SPLIT_NAMES`` order."""
        return {"train": self.train, "val": self.val, "test": self.test}


def split_index(
    rows: Iterable[Mapping[str, Any]],
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    max_images_per_class: int = 0,
    exclude: Sequence[str] = (),
) -> SplitResult:
    """Splits the index rows into train, val and test (rules in the module docstring).

    Args:
        rows: index rows, each with at least ``path``, ``label``, ``sha256`` and ``status``.
        val_fraction: share of each class for validation, in [0, 1).
        test_fraction: share of each class for test, in [0, 1); the sum with val must be < 1.
        seed: keys the hash that ranks images; another seed gives another split.
        max_images_per_class: use at most this many images of each class (0 = all).
        exclude: sha256 digests (every copy of those bytes) or paths of images to leave out.

    Returns:
        The splits and a JSON-ready report for ``metrics/split.json``.

    Raises:
        ValueError: bad arguments, malformed rows, or a class too small for the fractions.
    """
    _check_arguments(val_fraction, test_fraction, seed, max_images_per_class)
    rows = [_checked_row(row) for row in rows]
    _check_unique_paths(rows)
    rows, excluded, unmatched = _exclude(rows, exclude)
    usable = [row for row in rows if row["status"] == "ok"]
    conflicts = _label_conflicts(usable)
    usable = [row for row in usable if row["sha256"] not in conflicts]
    if not usable:
        raise ValueError(
            "the index has no usable images (status ok, no label conflict); check the download stage's report"
        )
    chosen, over_cap = _split_classes(
        usable,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        max_images_per_class=max_images_per_class,
    )
    splits = {
        name: sorted((row for groups in chosen.values() for group in groups[name] for row in group), key=_path)
        for name in SPLIT_NAMES
    }
    report = {
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "max_images_per_class": max_images_per_class,
        "classes": {label: _class_counts(groups) for label, groups in chosen.items()},
        "totals": {name: len(splits[name]) for name in SPLIT_NAMES} | {"total": sum(map(len, splits.values()))},
        "label_conflicts": [conflicts[sha] for sha in sorted(conflicts)],
        "dropped": {
            "not_ok": _not_ok_counts(rows),
            "label_conflict": sum(len(item["paths"]) for item in conflicts.values()),
            "over_cap": over_cap,
            "excluded": len(excluded),
        },
        "duplicate_groups": _duplicate_groups(chosen),
        "excluded": excluded,
        "exclude_unmatched": unmatched,
    }
    return SplitResult(train=splits["train"], val=splits["val"], test=splits["test"], report=report)


def describe(report: Mapping[str, Any]) -> str:
    """The split stage's one log line: split sizes, classes, and what was dropped."""
    totals, dropped = report["totals"], report["dropped"]
    return (
        f"train {totals['train']}, val {totals['val']}, test {totals['test']} images in {len(report['classes'])} "
        f"classes; dropped: {dropped['label_conflict']} label conflict(s), {dropped['over_cap']} over cap, "
        f"{sum(dropped['not_ok'].values())} not ok, {dropped.get('excluded', 0)} excluded (split.exclude)"
        + (
            f"; {len(report['exclude_unmatched'])} exclude entries matched no image"
            if report.get("exclude_unmatched")
            else ""
        )
    )


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _exclude(
    rows: Sequence[dict[str, str]], exclude: Sequence[str]
) -> tuple[list[dict[str, str]], list[dict[str, str]], list[str]]:
    """Drops the rows named by ``exclude`` (sha256 digests or paths).

    Returns:
        The rows kept, the excluded ones (path, label, sha256; sorted by path), and the entries
        that matched no row.
    """
    digests = {entry.lower() for entry in exclude if _SHA256.match(entry.lower())}
    paths = {entry for entry in exclude if entry.lower() not in digests}
    kept, excluded = [], []
    for row in rows:
        (excluded if row["sha256"] in digests or row["path"] in paths else kept).append(row)
    matched = {row["sha256"] for row in excluded} | {row["path"] for row in excluded}
    unmatched = sorted(entry for entry in exclude if entry.lower() not in matched and entry not in matched)
    listed = [{column: row[column] for column in ("path", "label", "sha256")} for row in excluded]
    return kept, sorted(listed, key=_path), unmatched


def _split_classes(
    rows: Sequence[dict[str, str]], *, seed: int, val_fraction: float, test_fraction: float, max_images_per_class: int
) -> tuple[dict[str, dict[str, Groups]], int]:
    """Splits each class's groups; returns {label: {split: groups}} and how many the cap dropped."""
    chosen: dict[str, dict[str, Groups]] = {}
    over_cap, problems = 0, []
    for label, class_rows in sorted(_by_label(rows).items()):
        groups, capped = _cap(_ranked_groups(class_rows, seed), max_images_per_class)
        over_cap += capped
        try:
            chosen[label] = _assign(groups, label=label, val_fraction=val_fraction, test_fraction=test_fraction)
        except ValueError as error:  # gather every class that is too small, then report them together
            problems.append(str(error))
    if problems:
        raise ValueError("\n".join(problems))
    return chosen, over_cap


def _not_ok_counts(rows: Sequence[dict[str, str]]) -> dict[str, int]:
    return dict(sorted(collections.Counter(row["status"] for row in rows if row["status"] != "ok").items()))


def _path(row: Mapping[str, str]) -> str:
    return row["path"]


def _class_counts(groups: dict[str, Groups]) -> dict[str, int]:
    counts = {name: sum(len(group) for group in groups[name]) for name in SPLIT_NAMES}
    return counts | {"total": sum(counts.values())}


def _duplicate_groups(chosen: dict[str, dict[str, Groups]]) -> list[dict[str, Any]]:
    """Every group of two or more byte-identical files: its label, split and paths."""
    described = [
        {"sha256": group[0]["sha256"], "label": label, "split": name, "paths": [row["path"] for row in group]}
        for label, groups in chosen.items()
        for name in SPLIT_NAMES
        for group in groups[name]
        if len(group) > 1
    ]
    return sorted(described, key=lambda item: item["paths"][0])


def _check_arguments(val_fraction: float, test_fraction: float, seed: int, max_images_per_class: int) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"split.{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"split.val_fraction + split.test_fraction must be < 1 (got {val_fraction} + {test_fraction}); "
            "lower one of them so that training data remains"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"base.seed must be a non-negative integer, got {seed!r}")
    if isinstance(max_images_per_class, bool) or not isinstance(max_images_per_class, int) or max_images_per_class < 0:
        raise ValueError(f"split.max_images_per_class must be an integer >= 0 (0 = all), got {max_images_per_class!r}")


def _checked_row(row: Mapping[str, Any]) -> dict[str, str]:
    missing = [column for column in tables.INDEX_REQUIRED_COLUMNS if column not in row]
    if missing:
        raise ValueError(
            f"index row {dict(row)!r} lacks column(s) {', '.join(missing)}; "
            f"required: {', '.join(tables.INDEX_REQUIRED_COLUMNS)}"
        )
    # Paths and labels are taken exactly as download wrote them: stripping them here would name
    # files that do not exist (download refuses class names with spaces at either end instead).
    clean = {column: str(row[column]) for column in tables.INDEX_REQUIRED_COLUMNS}
    clean["status"], clean["sha256"] = clean["status"].strip(), clean["sha256"].strip()
    if clean["status"] == "ok":
        empty = [column for column in tables.SPLIT_COLUMNS if not clean[column]]
        if empty:
            raise ValueError(
                f"index row for path {clean['path']!r} has an empty {', '.join(empty)}; re-run the download stage"
            )
    return clean


def _check_unique_paths(rows: Sequence[dict[str, str]]) -> None:
    counts = collections.Counter(row["path"] for row in rows)
    repeated = sorted(path for path, count in counts.items() if count > 1)
    if repeated:
        raise ValueError(
            f"the index lists {len(repeated)} path(s) more than once, e.g. {repeated[0]!r}; re-run the download stage"
        )


def _label_conflicts(rows: Sequence[dict[str, str]]) -> dict[str, dict[str, Any]]:
    """Maps each sha256 found under two or more labels to ``{sha256, labels, paths}``."""
    labels: dict[str, set[str]] = collections.defaultdict(set)
    paths: dict[str, list[str]] = collections.defaultdict(list)
    for row in rows:
        labels[row["sha256"]].add(row["label"])
        paths[row["sha256"]].append(row["path"])
    return {
        sha: {"sha256": sha, "labels": sorted(labels[sha]), "paths": sorted(paths[sha])}
        for sha in labels
        if len(labels[sha]) > 1
    }


def _by_label(rows: Sequence[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    grouped: dict[str, list[dict[str, str]]] = collections.defaultdict(list)
    for row in rows:
        grouped[row["label"]].append({column: row[column] for column in tables.SPLIT_COLUMNS})
    return grouped


def group_rank_key(seed: int, sha256: str) -> str:
    """The keyed hash that orders a class's groups: depends on the seed and the bytes only."""
    return hashlib.sha256(f"{seed}:{sha256}".encode("ascii")).hexdigest()


def _ranked_groups(rows: Sequence[dict[str, str]], seed: int) -> Groups:
    """Groups one class's rows by sha256, ranked by :func:`group_rank_key`."""
    groups: dict[str, list[dict[str, str]]] = collections.defaultdict(list)
    for row in rows:
        groups[row["sha256"]].append(row)
    ranked = sorted(groups, key=lambda sha: (group_rank_key(seed, sha), sha))
    return [sorted(groups[sha], key=lambda row: row["path"]) for sha in ranked]


def _cap(groups: Groups, cap: int) -> tuple[Groups, int]:
    """Keeps the first groups in rank order that fit under ``cap`` images; returns them and the dropped count."""
    if cap == 0:
        return groups, 0
    kept, count = [], 0
    for group in groups:
        if count + len(group) <= cap:
            kept.append(group)
            count += len(group)
    return kept, sum(map(len, groups)) - count


def target_count(total: int, fraction: float) -> int:
    """``round(total * fraction)`` rounding half up, and at least 1 when ``fraction > 0``."""
    if fraction <= 0.0:
        return 0
    return max(1, math.floor(total * fraction + 0.5))


def _prefix_length(groups: Sequence[list[Any]], target: int) -> int:
    """How many leading groups hold the image count closest to ``target``.

    Ties go to the smaller count, which leaves more for the splits after this one, except that
    a positive target always gets at least the first group.
    """
    count = 0
    for index, group in enumerate(groups):
        if count >= target:
            return index
        if count > 0 and count + len(group) - target >= target - count:
            return index  # taking this group would overshoot at least as far as stopping falls short
        count += len(group)
    return len(groups)


def _assign(groups: Groups, *, label: str, val_fraction: float, test_fraction: float) -> dict[str, Groups]:
    """Test takes the first groups, val the next, train the rest; raises on an empty split."""
    total = sum(map(len, groups))
    test_end = _prefix_length(groups, target_count(total, test_fraction))
    val_end = test_end + _prefix_length(groups[test_end:], target_count(total, val_fraction))
    chosen = {"test": groups[:test_end], "val": groups[test_end:val_end], "train": groups[val_end:]}
    fractions = {"train": 1.0, "val": val_fraction, "test": test_fraction}
    for name in SPLIT_NAMES:
        if fractions[name] > 0 and not chosen[name]:
            raise ValueError(
                f"class '{label}' has {total} usable image(s) in {len(groups)} distinct group(s), too few for a "
                f"non-empty {name} split with val_fraction {val_fraction} and test_fraction {test_fraction}; "
                "add images to that class, remove the class folder, or lower split.val_fraction / "
                "split.test_fraction (0 disables a split)"
            )
    return chosen
