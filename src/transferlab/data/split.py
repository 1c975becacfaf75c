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

import array
import collections
import hashlib
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from transferlab.data import tables

SPLIT_NAMES = ("train", "val", "test")
_DROPPED = 255  # the split code of a row in no split (not ok, excluded, a label conflict, over the cap)


class SplitResult:
    """Three splits (rows with ``path``, ``label``, ``sha256``; sorted by path) and the report.

    The result holds one split code per index row, not the rows: :meth:`stream_splits` reads each
    split's rows again from the index, one at a time, and :attr:`train`, :attr:`val`,
    :attr:`test` and :meth:`splits` list them (for tests and small datasets).
    """

    def __init__(self, source: Iterable[dict[str, str]], codes: bytes, report: dict[str, Any]) -> None:
        """``source``: the checked rows in path order, re-iterable; ``codes``: each row's split index."""
        self._source, self._codes, self.report = source, codes, report

    @property
    def train(self) -> list[dict[str, str]]:
        """The training split's rows."""
        return list(self._rows("train"))

    @property
    def val(self) -> list[dict[str, str]]:
        """The validation split's rows."""
        return list(self._rows("val"))

    @property
    def test(self) -> list[dict[str, str]]:
        """The test split's rows."""
        return list(self._rows("test"))

    def splits(self) -> dict[str, list[dict[str, str]]]:
        """The three splits by name, in ``SPLIT_NAMES`` order, as lists."""
        return {name: list(self._rows(name)) for name in SPLIT_NAMES}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SplitResult):
            return NotImplemented
        return self.splits() == other.splits() and self.report == other.report

    __hash__ = None  # type: ignore[assignment]  # mutable report: no hash, as the dataclass it replaces

    def stream_splits(self) -> Iterator[tuple[str, dict[str, str]]]:
        """``(split name, row)`` for every row in a split, in path order, read from the index one at a time.

        One pass over the index for all three splits
        (:func:`transferlab.data.tables.write_routed_splits` writes them).
        """
        codes = self._codes
        for number, row in enumerate(self._source):
            if codes[number] != _DROPPED:
                yield SPLIT_NAMES[codes[number]], _split_row(row)

    def _rows(self, name: str) -> Iterator[dict[str, str]]:
        return (row for split_name, row in self.stream_splits() if split_name == name)


def _split_row(row: Mapping[str, Any]) -> dict[str, str]:
    """An index row's split columns, as :func:`_checked_row` cleans them."""
    return {"path": str(row["path"]), "label": str(row["label"]), "sha256": str(row["sha256"]).strip()}


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

    Memory: when ``rows`` is re-iterable (a list, or :func:`transferlab.data.tables.stream_index`'s
    file reader) and in path order, as download writes the index, no row is held: one pass keeps
    per usable row its row number, class number and sha256 as 32 bytes (44 bytes), a second
    pass collects the paths of duplicate and conflicting images for the report, and
    :meth:`SplitResult.stream_splits` reads the rows again to write them. Other input (a
    generator, or rows out of path order) is first read into a list of checked rows and sorted.

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
    source: Iterable[Mapping[str, Any]] = rows if iter(rows) is not rows else list(rows)
    scan = _Scan(exclude)
    scan.read(source)
    if not scan.in_path_order:  # rows checked in their order above; now sorted, then scanned again
        checked = [_checked_row(row) for row in source]
        _check_unique_paths(checked)
        source = sorted(checked, key=_path)
        scan = _Scan(exclude)
        scan.read(source)
    groups = _Groups(scan)
    if not groups.usable:
        raise ValueError(
            "the index has no usable images (status ok, no label conflict); check the download stage's report"
        )
    codes, classes, over_cap = groups.assign(
        seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, max_images_per_class=max_images_per_class
    )
    paths = groups.collect_paths(source)
    totals = {name: sum(counts[name] for counts in classes.values()) for name in SPLIT_NAMES}
    report = {
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "max_images_per_class": max_images_per_class,
        "classes": classes,
        "totals": totals | {"total": sum(totals.values())},
        "label_conflicts": groups.conflicts(paths),
        "dropped": {
            "not_ok": dict(sorted(scan.not_ok.items())),
            "label_conflict": groups.conflict_rows,
            "over_cap": over_cap,
            "excluded": len(scan.excluded),
        },
        "duplicate_groups": groups.duplicates(paths),
        "excluded": sorted(scan.excluded, key=_path),
        "exclude_unmatched": scan.unmatched(),
    }
    return SplitResult(source, codes, report)


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


def _path(row: Mapping[str, str]) -> str:
    return row["path"]


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


def group_rank_key(seed: int, sha256: str) -> str:
    """The keyed hash that orders a class's groups: depends on the seed and the bytes only."""
    return hashlib.sha256(f"{seed}:{sha256}".encode("ascii")).hexdigest()


def target_count(total: int, fraction: float) -> int:
    """``round(total * fraction)`` rounding half up, and at least 1 when ``fraction > 0``."""
    if fraction <= 0.0:
        return 0
    return max(1, math.floor(total * fraction + 0.5))


def _cap(sizes: Sequence[int], cap: int) -> tuple[list[bool], int]:
    """Keeps the groups in rank order that fit under ``cap`` images; returns which, and the dropped count."""
    if cap == 0:
        return [True] * len(sizes), 0
    kept, count = [], 0
    for size in sizes:
        kept.append(count + size <= cap)
        count += size if kept[-1] else 0
    return kept, sum(sizes) - count


def _prefix_length(sizes: Sequence[int], target: int) -> int:
    """How many leading groups (of these ``sizes``) hold the image count closest to ``target``.

    Ties go to the smaller count, which leaves more for the splits after this one, except that
    a positive target always gets at least the first group.
    """
    count = 0
    for index, size in enumerate(sizes):
        if count >= target:
            return index
        if count > 0 and count + size - target >= target - count:
            return index  # taking this group would overshoot at least as far as stopping falls short
        count += size
    return len(sizes)


def _assign(sizes: Sequence[int], *, label: str, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """Test takes the first groups, val the next, train the rest; returns where test and val end.

    Raises:
        ValueError: a split with a positive fraction would be empty.
    """
    total = sum(sizes)
    test_end = _prefix_length(sizes, target_count(total, test_fraction))
    val_end = test_end + _prefix_length(sizes[test_end:], target_count(total, val_fraction))
    chosen = {"test": test_end, "val": val_end - test_end, "train": len(sizes) - val_end}
    fractions = {"train": 1.0, "val": val_fraction, "test": test_fraction}
    for name in SPLIT_NAMES:
        if fractions[name] > 0 and not chosen[name]:
            raise ValueError(
                f"class '{label}' has {total} usable image(s) in {len(sizes)} distinct group(s), too few for a "
                f"non-empty {name} split with val_fraction {val_fraction} and test_fraction {test_fraction}; "
                "add images to that class, remove the class folder, or lower split.val_fraction / "
                "split.test_fraction (0 disables a split)"
            )
    return test_end, val_end


# --------------------------------------------------------------------------------------------
# The compact passes


class _Scan:
    """One pass over the index rows: every row checked, and per usable row only three numbers.

    Excluded rows are listed (the report names each), rows that are not ok counted by status,
    and each usable row (ok, not excluded) keeps its row number, its class number and its
    sha256 as 32 bytes: 44 bytes, where a dict of the row's columns takes about 700. While the
    paths come in increasing order (which also proves them unique) nothing else is kept; once
    one does not, the pass only checks the remaining rows (``in_path_order`` is then False and
    :func:`split_index` sorts the rows and scans them again).
    """

    def __init__(self, exclude: Sequence[str]) -> None:
        self.exclude = exclude
        self.excluded_digests = {entry.lower() for entry in exclude if _SHA256.match(entry.lower())}
        self.excluded_paths = {entry for entry in exclude if entry.lower() not in self.excluded_digests}
        self.excluded: list[dict[str, str]] = []
        self.matched: set[str] = set()
        self.not_ok: collections.Counter[str] = collections.Counter()
        self.labels: dict[str, int] = {}  # class name -> class number, in order of appearance
        self.numbers, self.classes, self.digests = array.array("q"), array.array("i"), bytearray()
        self.odd: dict[bytes, str] = {}  # stand-in digest -> a sha256 value that is not 64 lowercase hex digits
        self.count, self.in_path_order = 0, True

    def read(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Checks and records every row of ``rows`` (in their order; the first malformed one raises)."""
        previous = None
        for number, row in enumerate(rows):
            clean = _checked_row(row)
            self.count = number + 1
            path, sha = clean["path"], clean["sha256"]
            if previous is not None and path <= previous:
                self.in_path_order = False
            previous = path
            if not self.in_path_order:
                continue
            if sha in self.excluded_digests or path in self.excluded_paths:
                self.excluded.append({column: clean[column] for column in tables.SPLIT_COLUMNS})
                self.matched.update((sha, path))
            elif clean["status"] != "ok":
                self.not_ok[clean["status"]] += 1
            else:
                self.numbers.append(number)
                self.classes.append(self.labels.setdefault(clean["label"], len(self.labels)))
                self.digests += self._digest(sha)

    def _digest(self, sha: str) -> bytes:
        if _SHA256.match(sha):
            return bytes.fromhex(sha)
        # A hand-edited index: any other text still groups by equality, as a 32-byte stand-in.
        stand_in = hashlib.sha256(b"not hex\0" + sha.encode("utf-8", "surrogatepass")).digest()
        self.odd[stand_in] = sha
        return stand_in

    def unmatched(self) -> list[str]:
        """The ``exclude`` entries that matched no row, sorted."""
        matched = self.matched
        return sorted(entry for entry in self.exclude if entry.lower() not in matched and entry not in matched)


_DIGEST = np.dtype([("a", ">u8"), ("b", ">u8"), ("c", ">u8"), ("d", ">u8")])  # 32 bytes that sort as bytes


def _group_digests(digests: bytes | bytearray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Groups equal 32-byte digests: each group's digest (groups, 32), each row's group, each group's size.

    Grouping by the first 8 bytes, then checking the other 24 against the group's first row,
    costs a quarter of sorting whole digests; if two digests ever shared their first 8 bytes but
    not the rest, the whole 32 decide.
    """
    words = np.frombuffer(digests, dtype=">u8").reshape(-1, 4)
    _, first, inverse, sizes = np.unique(words[:, 0], return_index=True, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    if not all(np.array_equal(words[:, column], words[first, column][inverse]) for column in (1, 2, 3)):
        whole, inverse, sizes = np.unique(words.view(_DIGEST).reshape(-1), return_inverse=True, return_counts=True)
        return whole.view(np.uint8).reshape(-1, 32), inverse.reshape(-1).astype(np.int32), sizes
    return words[first].view(np.uint8).reshape(-1, 32), inverse.astype(np.int32), sizes


class _Groups:
    """The usable rows' groups of byte-identical files, as numpy arrays (group number per row)."""

    def __init__(self, scan: _Scan) -> None:
        self.scan = scan
        names = {number: name for name, number in scan.labels.items()}
        self.digests, self.inverse, self.sizes = _group_digests(scan.digests)
        scan.digests = bytearray()  # the groups' digests are all that is needed from here on
        classes = np.frombuffer(scan.classes, dtype=np.int32)
        pairs = np.unique(self.inverse.astype(np.int64) * max(len(names), 1) + classes)  # (group, class) seen
        pair_groups = pairs // max(len(names), 1)
        self.in_conflict = np.bincount(pair_groups, minlength=len(self.sizes)) > 1  # one sha256 under 2+ labels
        self.conflict_labels: dict[int, list[str]] = collections.defaultdict(list)
        for pair in pairs[self.in_conflict[pair_groups]].tolist():
            self.conflict_labels[pair // max(len(names), 1)].append(names[pair % max(len(names), 1)])
        self.group_class = np.zeros(len(self.sizes), dtype=np.int32)
        self.group_class[self.inverse] = classes
        self.conflict_rows = int(self.in_conflict[self.inverse].sum())
        self.usable = len(self.inverse) - self.conflict_rows
        self.codes = np.full(len(self.sizes), _DROPPED, dtype=np.uint8)

    def sha256(self, group: int) -> str:
        """The sha256 text of a group, as the index wrote it."""
        digest = self.digests[group].tobytes()
        return self.scan.odd.get(digest) or digest.hex()

    def assign(
        self, *, seed: int, val_fraction: float, test_fraction: float, max_images_per_class: int
    ) -> tuple[bytes, dict[str, dict[str, int]], int]:
        """Splits each class's groups (module docstring, 4-6).

        Returns:
            One split code per index row (``SPLIT_NAMES`` index, or 255 for none), the image
            counts per class and split, and how many images the cap dropped.

        Raises:
            ValueError: naming every class too small for the fractions.
        """
        classes: dict[str, dict[str, int]] = {}
        over_cap, problems = 0, []
        for label in sorted(self.scan.labels):
            members = np.flatnonzero((self.group_class == self.scan.labels[label]) & ~self.in_conflict)
            if not len(members):
                continue  # every image of the class is in a label conflict
            ranked = self._ranked(members, seed)
            kept, capped = _cap(self.sizes[ranked].tolist(), max_images_per_class)
            over_cap += capped
            ranked = ranked[np.asarray(kept, dtype=bool)]
            sizes = self.sizes[ranked].tolist()
            try:
                test_end, val_end = _assign(sizes, label=label, val_fraction=val_fraction, test_fraction=test_fraction)
            except ValueError as error:  # gather every class that is too small, then report them together
                problems.append(str(error))
                continue
            bounds = {"test": (0, test_end), "val": (test_end, val_end), "train": (val_end, len(ranked))}
            counts = {name: sum(sizes[slice(*bounds[name])]) for name in SPLIT_NAMES}
            for name, (begin, end) in bounds.items():
                self.codes[ranked[begin:end]] = SPLIT_NAMES.index(name)
            classes[label] = counts | {"total": sum(counts.values())}
        if problems:
            raise ValueError("\n".join(problems))
        codes = np.full(self.scan.count, _DROPPED, dtype=np.uint8)
        codes[np.frombuffer(self.scan.numbers, dtype=np.int64)] = self.codes[self.inverse]
        return codes.tobytes(), classes, over_cap

    def _ranked(self, members: np.ndarray, seed: int) -> np.ndarray:
        """``members`` (group numbers) in the order of :func:`group_rank_key`."""
        keys = b"".join(bytes.fromhex(group_rank_key(seed, self.sha256(group))) for group in members.tolist())
        return members[np.argsort(np.frombuffer(keys, dtype=_DIGEST), kind="stable")]

    def _listed(self) -> np.ndarray:
        """Whether each group's paths go into the report: a label conflict, or a duplicate group in a split."""
        return self.in_conflict | ((self.codes != _DROPPED) & (self.sizes > 1))

    def collect_paths(self, source: Iterable[Mapping[str, Any]]) -> dict[int, list[str]]:
        """The paths (in path order) of each group the report lists, read in one more pass over ``source``."""
        listed = self._listed()[self.inverse]
        if not listed.any():
            return {}
        numbers = np.frombuffer(self.scan.numbers, dtype=np.int64)[listed].tolist()
        group_of = dict(zip(numbers, self.inverse[listed].tolist(), strict=True))
        paths: dict[int, list[str]] = collections.defaultdict(list)
        for number, row in enumerate(source):
            if number in group_of:
                paths[group_of[number]].append(str(row["path"]))
                if number == numbers[-1]:
                    break
        return paths

    def conflicts(self, paths: dict[int, list[str]]) -> list[dict[str, Any]]:
        """The report's label conflicts, by sha256."""
        listed = [
            {"sha256": self.sha256(group), "labels": sorted(labels), "paths": paths[group]}
            for group, labels in self.conflict_labels.items()
        ]
        return sorted(listed, key=lambda item: item["sha256"])

    def duplicates(self, paths: dict[int, list[str]]) -> list[dict[str, Any]]:
        """Every group of two or more byte-identical files in a split: its label, split and paths."""
        names = {number: name for name, number in self.scan.labels.items()}
        described = [
            {
                "sha256": self.sha256(group),
                "label": names[int(self.group_class[group])],
                "split": SPLIT_NAMES[int(self.codes[group])],
                "paths": paths[group],
            }
            for group in np.flatnonzero((self.codes != _DROPPED) & (self.sizes > 1)).tolist()
        ]
        return sorted(described, key=lambda item: item["paths"][0])
