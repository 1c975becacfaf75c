"""split_index: disjoint, stratified, seeded, order-free, duplicate- and conflict-aware."""

from __future__ import annotations

import hashlib
import math
import random

import pytest

from transferlab.data import split


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _rows(counts: dict[str, int], *, prefix: str = "img") -> list[dict[str, str]]:
    """Index rows with distinct content: ``counts`` images per class."""
    rows = []
    for label, count in counts.items():
        for index in range(count):
            path = f"{label}/{prefix}{index:04d}.jpg"
            rows.append(
                {
                    "path": path,
                    "label": label,
                    "sha256": _sha(path),
                    "width": "10",
                    "height": "10",
                    "status": "ok",
                    "detail": "",
                }
            )
    return rows


def _assignment(result: split.SplitResult) -> dict[str, str]:
    return {row["path"]: name for name, rows in result.splits().items() for row in rows}


def _split(rows, **overrides):
    arguments = {"val_fraction": 0.1, "test_fraction": 0.2, "seed": 42} | overrides
    return split.split_index(rows, **arguments)


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def test_splits_are_disjoint_cover_every_image_and_are_sorted_by_path():
    rows = _rows({"a": 50, "b": 31, "c": 17})
    result = _split(rows)
    paths = [row["path"] for rows_ in result.splits().values() for row in rows_]
    assert len(paths) == len(set(paths)) == len(rows)
    for rows_ in result.splits().values():
        assert [row["path"] for row in rows_] == sorted(row["path"] for row in rows_)
        assert all(set(row) == {"path", "label", "sha256"} for row in rows_)


@pytest.mark.parametrize("count", [7, 10, 23, 100, 633, 898])
@pytest.mark.parametrize(("val_fraction", "test_fraction"), [(0.1, 0.2), (0.15, 0.15), (0.25, 0.5)])
def test_each_class_is_within_one_image_of_its_share(count, val_fraction, test_fraction):
    result = _split(_rows({"a": count, "b": count + 3}), val_fraction=val_fraction, test_fraction=test_fraction)
    for label, total in (("a", count), ("b", count + 3)):
        counts = result.report["classes"][label]
        assert counts["total"] == total
        assert abs(counts["test"] - _round_half_up(total * test_fraction)) <= 1
        assert abs(counts["val"] - _round_half_up(total * val_fraction)) <= 1
        assert counts["train"] == total - counts["val"] - counts["test"]
        in_folder = [row for rows in result.splits().values() for row in rows if row["path"].startswith(f"{label}/")]
        assert {row["label"] for row in in_folder} == {label}


def test_same_seed_same_split_other_seed_other_split():
    rows = _rows({"a": 60, "b": 40})
    assert _split(rows) == _split(rows)
    assert _assignment(_split(rows, seed=1)) != _assignment(_split(rows, seed=2))


def test_independent_of_row_order():
    rows = _rows({"a": 60, "b": 40, "c": 25})
    shuffled = rows[:]
    random.Random(7).shuffle(shuffled)
    assert _split(shuffled) == _split(rows)


def test_assignment_follows_the_bytes_not_the_path():
    rows = _rows({"a": 60})
    renamed = [row | {"path": row["path"].replace("img", "renamed")} for row in rows]
    by_sha = {row["sha256"]: name for name, rows_ in _split(rows).splits().items() for row in rows_}
    by_sha_renamed = {row["sha256"]: name for name, rows_ in _split(renamed).splits().items() for row in rows_}
    assert by_sha == by_sha_renamed


def test_byte_identical_copies_stay_in_one_split_and_are_reported():
    rows = _rows({"a": 40, "b": 40})
    for group in range(6):  # six groups of three copies each in class a
        sha = _sha(f"shared-{group}")
        for copy in range(3):
            rows.append({"path": f"a/dup{group}-{copy}.jpg", "label": "a", "sha256": sha, "status": "ok"})
    result = _split(rows, val_fraction=0.2, test_fraction=0.3)
    assignment = _assignment(result)
    for group in range(6):
        assert len({assignment[f"a/dup{group}-{copy}.jpg"] for copy in range(3)}) == 1
    assert len(result.report["duplicate_groups"]) == 6
    reported = {item["sha256"]: item for item in result.report["duplicate_groups"]}
    item = reported[_sha("shared-0")]
    assert item["paths"] == [f"a/dup0-{copy}.jpg" for copy in range(3)]
    assert item["split"] == assignment["a/dup0-0.jpg"] and item["label"] == "a"
    counts = result.report["classes"]["a"]
    assert counts["total"] == 58
    assert abs(counts["test"] - _round_half_up(58 * 0.3)) <= 2  # a group of 3 may straddle the boundary


def test_label_conflicts_are_dropped_from_every_split_and_reported():
    rows = _rows({"roses": 20, "tulips": 20})
    twin = _sha("the same photo")
    rows.append({"path": "roses/twin.jpg", "label": "roses", "sha256": twin, "status": "ok"})
    rows.append({"path": "tulips/twin.jpg", "label": "tulips", "sha256": twin, "status": "ok"})
    rows.append({"path": "tulips/twin-copy.jpg", "label": "tulips", "sha256": twin, "status": "ok"})
    result = _split(rows)
    assert not any("twin" in path for path in _assignment(result))
    assert result.report["label_conflicts"] == [
        {
            "sha256": twin,
            "labels": ["roses", "tulips"],
            "paths": ["roses/twin.jpg", "tulips/twin-copy.jpg", "tulips/twin.jpg"],
        }
    ]
    assert result.report["dropped"]["label_conflict"] == 3
    assert result.report["totals"]["total"] == 40


def test_rows_that_are_not_ok_are_left_out_and_counted():
    rows = _rows({"a": 20})
    rows.append({"path": "a/broken.jpg", "label": "a", "sha256": _sha("x"), "status": "corrupt"})
    rows.append({"path": "a/notes.txt", "label": "a", "sha256": _sha("y"), "status": "not-an-image"})
    rows.append({"path": "a/tiny.jpg", "label": "a", "sha256": "", "status": "too-small"})
    result = _split(rows)
    assert set(_assignment(result)) == {row["path"] for row in rows if row["status"] == "ok"}
    assert result.report["dropped"]["not_ok"] == {"corrupt": 1, "not-an-image": 1, "too-small": 1}


def test_cap_keeps_the_first_images_in_hash_order():
    rows = _rows({"a": 100, "b": 7})
    result = _split(rows, max_images_per_class=20)
    assert result.report["classes"]["a"]["total"] == 20
    assert result.report["classes"]["b"]["total"] == 7
    assert result.report["dropped"]["over_cap"] == 80
    kept_20 = set(_assignment(result))
    kept_40 = set(_assignment(_split(rows, max_images_per_class=40)))
    assert kept_20 < kept_40  # a larger cap only adds images
    shuffled = rows[::-1]
    assert set(_assignment(_split(shuffled, max_images_per_class=20))) == kept_20


def test_adding_images_keeps_most_earlier_assignments():
    rows = _rows({"a": 300, "b": 200})
    before = _assignment(_split(rows))
    grown = rows + _rows({"a": 30, "b": 20}, prefix="new")
    after = _assignment(_split(grown))
    unchanged = sum(before[path] == after[path] for path in before)
    assert unchanged >= 0.95 * len(before)
    # A re-shuffle would keep only about 0.7*0.7 + 0.1*0.1 + 0.2*0.2 = 54%.


def test_zero_fraction_gives_an_empty_split():
    result = _split(_rows({"a": 30, "b": 12}), val_fraction=0.0, test_fraction=0.25)
    assert result.val == []
    assert result.report["totals"]["val"] == 0
    assert result.report["classes"]["a"]["test"] == 8


def test_small_class_still_gets_one_held_out_image_when_fraction_is_positive():
    result = _split(_rows({"a": 5, "b": 50}), val_fraction=0.05, test_fraction=0.05)
    assert result.report["classes"]["a"] == {"train": 3, "val": 1, "test": 1, "total": 5}


def test_report_totals_match_the_splits():
    result = _split(_rows({"a": 33, "b": 21}))
    assert result.report["totals"] == {
        "train": len(result.train),
        "val": len(result.val),
        "test": len(result.test),
        "total": 54,
    }
    assert result.report["seed"] == 42


def test_class_too_small_names_the_class_and_what_to_change():
    with pytest.raises(ValueError, match=r"class 'tiny' has 2 usable image\(s\).*split\.val_fraction"):
        _split(_rows({"big": 40, "tiny": 2}))


def test_every_class_that_is_too_small_is_named():
    with pytest.raises(ValueError) as raised:
        _split(_rows({"big": 40, "tiny": 2, "wee": 1}))
    assert "class 'tiny' has 2" in str(raised.value) and "class 'wee' has 1" in str(raised.value)
    assert "'big'" not in str(raised.value)


def test_class_of_one_duplicate_group_cannot_be_split():
    rows = _rows({"big": 40})
    rows += [
        {"path": f"same/{index}.jpg", "label": "same", "sha256": _sha("one"), "status": "ok"} for index in range(6)
    ]
    with pytest.raises(ValueError, match=r"class 'same' has 6 usable image\(s\) in 1 distinct group"):
        _split(rows)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"val_fraction": 0.7, "test_fraction": 0.4}, r"val_fraction \+ split\.test_fraction must be < 1"),
        ({"val_fraction": -0.1}, r"split\.val_fraction must be in \[0, 1\)"),
        ({"test_fraction": 1.0}, r"split\.test_fraction must be in \[0, 1\)"),
        ({"seed": -1}, r"base\.seed"),
        ({"max_images_per_class": -5}, r"split\.max_images_per_class"),
    ],
)
def test_bad_arguments_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        _split(_rows({"a": 20}), **overrides)


def test_malformed_rows_are_refused():
    with pytest.raises(ValueError, match="lacks column.*status"):
        _split([{"path": "a/1.jpg", "label": "a", "sha256": _sha("1")}])
    with pytest.raises(ValueError, match="more than once.*a/img0000.jpg"):
        _split(_rows({"a": 20}) + _rows({"a": 1}))
    with pytest.raises(ValueError, match="empty sha256"):
        _split(_rows({"a": 20}) + [{"path": "a/x.jpg", "label": "a", "sha256": "", "status": "ok"}])
    with pytest.raises(ValueError, match="no usable images"):
        _split([row | {"status": "corrupt"} for row in _rows({"a": 20})])
