"""download, split and augment stream their rows: they give what holding every row gave, without holding them.

Each test here fails if a stage goes back to a list of every row where it streams: a generator is
consumed lazily, a re-iterable source's row objects are all released when a split is done, and
the compact per-row record is the one split documents (44 bytes per usable row).
"""

from __future__ import annotations

import concurrent.futures
import gc
import hashlib
import itertools
import random
import weakref
from pathlib import Path

import pytest

from support import write_dataset
from transferlab.data import augment, augment_preview, download, index, split, tables

RANGES = {"flip": True, "zoom": 0.2, "rotation": 15.0, "brightness": 0.1, "contrast": 0.1}


class Row(dict):
    """A dict that can be weakly referenced, so a test can tell whether anything still holds it."""

    __slots__ = ("__weakref__",)


class Source:
    """A re-iterable table like ``tables.TableRows``: every pass makes fresh row objects and is counted."""

    def __init__(self, rows: list[dict[str, str]]) -> None:
        self.rows, self.passes, self.made = rows, 0, []

    def __iter__(self):
        self.passes += 1
        for row in self.rows:
            fresh = Row(row)
            self.made.append(weakref.ref(fresh))
            yield fresh

    def alive(self) -> int:
        """How many of the row objects made so far are still referenced."""
        return sum(reference() is not None for reference in self.made)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _index(counts: dict[str, int], duplicates: int = 0) -> list[dict[str, str]]:
    """Index rows in path order: ``counts`` images per class, some byte-identical copies, one conflict, two not ok."""
    rows = [
        {"path": f"{label}/{number:04d}.jpg", "label": label, "sha256": _sha(f"{label}{number}"), "status": "ok"}
        for label, count in counts.items()
        for number in range(count)
    ]
    for number in range(duplicates):  # copies of the first images of the first class, in that class
        label = next(iter(counts))
        rows.append(
            {"path": f"{label}/copy{number}.jpg", "label": label, "sha256": _sha(f"{label}{number}"), "status": "ok"}
        )
    last = list(counts)[-1]
    rows.append({"path": f"{last}/twin.jpg", "label": last, "sha256": _sha(f"{next(iter(counts))}1"), "status": "ok"})
    rows.append({"path": f"{last}/broken.jpg", "label": last, "sha256": "", "status": "corrupt"})
    rows.append({"path": f"{last}/notes.txt", "label": last, "sha256": _sha("notes"), "status": "not-an-image"})
    return sorted(rows, key=lambda row: row["path"])


SPLIT_ARGUMENTS = {"val_fraction": 0.2, "test_fraction": 0.2, "seed": 3, "exclude": ("b/0003.jpg",)}


# ---------------------------------------------------------------------------------- download


def _tangled_tree(root: Path) -> list:
    """Class folders whose names and sub-folders make the walk order differ from the path order."""
    write_dataset(root, per_class={"a": 2, "a b": 2, "a.b": 2, "a0": 2}, size=(20, 20))
    (root / "a" / "a").mkdir()
    (root / "a" / "a" / "x.jpg").write_bytes((root / "a" / "a_000.jpg").read_bytes())  # a copy, in a sub-folder
    (root / "a" / "a.jpg").write_bytes(b"not an image")
    (root / "a" / "a0.jpg").write_bytes(b"neither")
    (root / "a" / "deep" / "er").mkdir(parents=True)
    (root / "a" / "deep" / "er" / "z.txt").write_text("z")
    (root / "a" / "linked").symlink_to(root / "a b", target_is_directory=True)
    (root / "a" / "dangling.jpg").symlink_to(root / "nowhere.jpg")
    (root / "a" / ".hidden").mkdir()
    (root / "a" / ".hidden" / "h.jpg").write_text("h")
    (root / "a0" / "bad\\x01.jpg").write_bytes(b"y")  # a backslash: usable, its path that of the escaped one
    (root / "a0" / "bad\x01.jpg").write_bytes(b"z")  # a control character: a bad name, its path escaped
    (root / "a0" / "new\nline.jpg").write_bytes(b"n")
    return index.class_folders(root)


def test_files_come_in_path_order_as_the_walk_finds_them(tmp_path):
    classes = _tangled_tree(tmp_path / "data")
    walked = [file.relative_to(tmp_path / "data").as_posix() for folder in classes for file in index.walk_files(folder)]
    assert walked != sorted(walked)  # the walk's own order is not the path order here
    assert list(index.files_in_path_order(classes)) == sorted(walked)


def test_index_rows_check_each_file_only_when_its_row_is_read(tmp_path, monkeypatch):
    root = tmp_path / "data"
    _tangled_tree(root)
    listed = list(index.index_rows(root, workers=2, min_image_side=8, max_image_pixels=10**6, max_files=100))
    checked = []
    original = index._check_file
    monkeypatch.setattr(
        index, "_check_file", lambda *args, **kwargs: checked.append(args[1]) or original(*args, **kwargs)
    )
    rows = index.index_rows(root, workers=1, min_image_side=8, max_image_pixels=10**6, max_files=100)
    assert checked == []  # the layout is checked at the call, the files as the rows are read
    first = next(rows)
    assert len(checked) == 1 and first.path == checked[0]
    rest = list(rows)
    assert [row.path for row in [first, *rest]] == sorted(row.path for row in [first, *rest])
    assert [first, *rest] == listed  # as the worker processes' rows, in the same order
    assert any(row.status == index.BAD_NAME for row in rest)


def test_worker_checks_run_only_a_few_chunks_ahead():
    pulled = []

    def items():
        for number in itertools.count():
            pulled.append(number)
            yield str(number)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = index._ordered_map(pool, len, items(), chunksize=5, ahead=3)
        assert list(itertools.islice(results, 12)) == [(str(number), len(str(number))) for number in range(12)]
        assert len(pulled) <= 5 * (3 + 2) + 1  # the chunks taken plus those in flight, not the endless input
        results.close()


def test_streamed_index_and_report_equal_the_listed_ones(tmp_path):
    root = tmp_path / "data"
    _tangled_tree(root)
    settings = dict(source=str(root), sha256="", min_images_per_class=1, retries=0, deadline_seconds=30, workers=2)
    limits = dict(
        min_image_side=8, max_image_pixels=10**6, max_files=100, max_total_bytes=10**8, max_expansion_ratio=10
    )
    listed = download.prepare_dataset(destination=tmp_path / "one", **settings, **limits)
    streamed = download.prepare_dataset(
        destination=tmp_path / "two", index_path=tmp_path / "index.csv", **settings, **limits
    )
    tables.write_index(listed.rows, tmp_path / "listed.csv")
    assert streamed.rows is None
    assert (tmp_path / "index.csv").read_bytes() == (tmp_path / "listed.csv").read_bytes()
    listed.metrics.pop("seconds"), streamed.metrics.pop("seconds")
    assert streamed.metrics == listed.metrics
    assert streamed.metrics["duplicate_groups"] == 1 and streamed.metrics["excluded"]["link"] == 2


def test_index_summary_keeps_eight_bytes_per_image_and_no_row():
    rows = [tables.IndexRow(f"a/{n}.jpg", "a", _sha(str(n % 7)), 9, 9, "ok", "") for n in range(40)]
    rows += [tables.IndexRow("a/x.txt", "a", "", None, None, "not-an-image", "why")]
    references = [weakref.ref(row) for row in rows]
    summary = download.IndexSummary()
    assert sum(1 for _ in summary.count(iter(rows))) == 41
    assert (len(summary.hashes), summary.hashes.itemsize) == (40, 8)
    metrics = summary.report(rows, source="s", archive_sha256=None, seconds=0)
    assert metrics == download.summarize(rows, source="s", archive_sha256=None, seconds=0)
    assert metrics["duplicate_groups"] == 7
    del rows, metrics
    gc.collect()
    assert all(reference() is None for reference in references)


# ---------------------------------------------------------------------------------- split


def test_split_of_rows_in_path_order_holds_none_of_them(tmp_path):
    rows = _index({"a": 40, "b": 30, "c": 25}, duplicates=4)
    source = Source(rows)
    result = split.split_index(source, **SPLIT_ARGUMENTS)
    gc.collect()
    assert source.alive() == 0  # no row object outlives its pass: the result keeps split codes, not rows
    assert source.passes == 2  # one pass to plan, one for the report's duplicate and conflict paths
    expected = split.split_index(list(reversed(rows)), **SPLIT_ARGUMENTS)  # out of order: read into a list
    assert result.report == expected.report and result.splits() == expected.splits()
    assert result.report["duplicate_groups"] and result.report["label_conflicts"]
    streamed = result.stream_splits()
    first = next(streamed)
    gc.collect()
    assert source.alive() == 1  # writing the splits reads one row at a time
    assert first == min(((name, row) for name, rows_ in expected.splits().items() for row in rows_), key=_path_of)
    tables.write_routed_splits(itertools.chain([first], streamed), split.SPLIT_NAMES, tmp_path / "splits")
    assert [tables.read_split(tmp_path / "splits" / f"{name}.csv") for name in split.SPLIT_NAMES] == list(
        expected.splits().values()
    )


def _path_of(pair: tuple[str, dict[str, str]]) -> str:
    return pair[1]["path"]


def test_split_keeps_three_numbers_per_usable_row():
    rows = _index({"a": 30, "b": 20})
    scan = split._Scan(())
    scan.read(rows)
    usable = sum(row["status"] == "ok" for row in rows)
    assert scan.in_path_order
    assert (len(scan.numbers), len(scan.classes), len(scan.digests)) == (usable, usable, 32 * usable)
    assert scan.numbers.itemsize + scan.classes.itemsize + 32 == 44
    shuffled = split._Scan(())
    shuffled.read(random.Random(0).sample(rows, len(rows)))
    assert not shuffled.in_path_order and len(shuffled.digests) < 32 * usable  # stops recording once out of order


def test_split_groups_any_sha256_text_as_before():
    rows = _index({"a": 12, "b": 12})
    rows = [
        row | {"sha256": "NOT-HEX" if row["path"] in ("a/0001.jpg", "a/0002.jpg") else row["sha256"]} for row in rows
    ]
    result = split.split_index(rows, **SPLIT_ARGUMENTS)
    assert [item["paths"] for item in result.report["duplicate_groups"]] == [["a/0001.jpg", "a/0002.jpg"]]
    assert result.report["duplicate_groups"][0]["sha256"] == "NOT-HEX"


def test_split_tells_digests_apart_that_share_their_first_bytes():
    rows = _index({"a": 12, "b": 12})
    shared = ["00" * 8 + "aa" * 24, "00" * 8 + "bb" * 24]  # one 8-byte prefix, two images
    rows = [row | {"sha256": shared[0]} if row["path"] == "a/0001.jpg" else row for row in rows]
    rows = [row | {"sha256": shared[1]} if row["path"] == "a/0002.jpg" else row for row in rows]
    result = split.split_index(rows, **SPLIT_ARGUMENTS)
    assert result.report["duplicate_groups"] == [] and result.report["classes"]["a"]["total"] == 12
    assert {row["sha256"] for rows_ in result.splits().values() for row in rows_} >= set(shared)


# ---------------------------------------------------------------------------------- tables


def test_stream_split_reads_lazily_and_again(tmp_path):
    rows = [{"path": f"a/{number}.jpg", "label": "a", "sha256": _sha(str(number))} for number in range(5)]
    tables.write_splits({"train": iter(rows)}, tmp_path / "splits")  # a generator is written as it comes
    streamed = tables.stream_split(tmp_path / "splits" / "train.csv")
    assert list(streamed) == list(streamed) == rows == tables.read_split(tmp_path / "splits" / "train.csv")
    assert tables.in_path_order(streamed) is streamed  # already sorted: not read into a list
    shuffled = rows[::-1]
    assert tables.in_path_order(shuffled) == rows and tables.in_path_order(iter(shuffled)) == rows


# ---------------------------------------------------------------------------------- augment


def test_recipes_pull_each_training_row_only_when_its_views_are_written(tmp_path):
    pulled = []

    def rows():
        for number in itertools.count():
            pulled.append(number)
            yield {"path": f"a/{number:06d}.jpg", "label": "a", "sha256": _sha(str(number))}

    recipes = augment.iter_recipes(rows(), copies=2, seed=1, **RANGES)  # an endless generator: never listed
    first = list(itertools.islice(recipes, 7))
    assert len(pulled) == 3 and [row["recipe"] == "" for row in first] == [True, False, False] * 2 + [True]
    bounded = [{"path": f"a/{number:06d}.jpg", "label": "a", "sha256": _sha(str(number))} for number in range(50)]
    assert list(augment.iter_recipes(iter(bounded), copies=2, seed=1, **RANGES)) == augment.make_recipes(
        bounded[::-1], copies=2, seed=1, **RANGES
    )
    written = tables.write_recipes(augment.iter_recipes(iter(bounded), copies=2, seed=1, **RANGES), tmp_path / "r.csv")
    assert written == 150


def test_recipe_ranges_are_checked_before_any_row_is_read():
    def rows():
        raise AssertionError("read a row")
        yield  # pragma: no cover

    with pytest.raises(ValueError, match="augment.zoom"):
        augment.iter_recipes(rows(), copies=1, seed=1, **(RANGES | {"zoom": 1.0}))


def test_preview_sample_streams_rows_in_any_order():
    rows = [{"path": f"{label}/{number:03d}", "label": label} for label in "cab" for number in range(40)]
    rows += [{"path": "b/000", "label": "b", "extra": "second copy of a path"}]
    expected = ["a/000", "b/000", "c/000", "a/001", "b/000", "c/001", "a/002"]
    for order in (rows, rows[::-1], random.Random(1).sample(rows, len(rows))):
        sample = augment_preview.preview_sample(iter(order), 7)
        assert [row["path"] for row in sample] == expected
    first_b = augment_preview.preview_sample(iter(rows), 2)[1]  # equal paths keep their order, as a stable sort
    assert "extra" not in first_b
