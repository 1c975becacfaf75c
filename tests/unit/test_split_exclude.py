"""split.exclude: confirmed label errors (sha256 or path) leave every split and are listed in the report."""

from __future__ import annotations

import pytest

from transferlab.core import params
from transferlab.data import split

PREFIX = {"daisy": "d", "roses": "e"}  # hexadecimal, as sha256 digests are


def index_rows():
    rows = []
    for label in ("daisy", "roses"):
        for number in range(10):
            rows.append(
                {"path": f"{label}/{number}.jpg", "label": label, "sha256": f"{PREFIX[label]}{number}".ljust(64, "0"),
                 "status": "ok"}
            )  # fmt: skip
    rows.append({"path": "roses/copy-of-0.jpg", "label": "roses", "sha256": "e0".ljust(64, "0"), "status": "ok"})
    return rows


def all_paths(result):
    return {row["path"] for rows in result.splits().values() for row in rows}


def test_excluded_images_leave_every_split_and_are_listed():
    by_sha = "e0".ljust(64, "0").upper()  # every copy of these bytes; case does not matter
    result = split.split_index(
        index_rows(),
        val_fraction=0.2,
        test_fraction=0.2,
        seed=1,
        exclude=[by_sha, "daisy/3.jpg", "daisy/no-such.jpg"],
    )
    gone = {"roses/0.jpg", "roses/copy-of-0.jpg", "daisy/3.jpg"}
    assert not gone & all_paths(result)
    assert len(all_paths(result)) == 21 - 3
    assert [row["path"] for row in result.report["excluded"]] == sorted(gone)
    assert result.report["excluded"][0] == {"path": "daisy/3.jpg", "label": "daisy", "sha256": "d3".ljust(64, "0")}
    assert result.report["dropped"]["excluded"] == 3
    assert result.report["exclude_unmatched"] == ["daisy/no-such.jpg"]
    assert "3 excluded (split.exclude); 1 exclude entries matched no image" in split.describe(result.report)


def test_without_exclusions_the_split_is_unchanged():
    plain = split.split_index(index_rows(), val_fraction=0.2, test_fraction=0.2, seed=1)
    empty = split.split_index(index_rows(), val_fraction=0.2, test_fraction=0.2, seed=1, exclude=[])
    assert plain.splits() == empty.splits() and plain.report["excluded"] == []


def test_the_params_key_takes_a_list_of_distinct_entries():
    assert params.parse_section("split", {"exclude": ["daisy/3.jpg"]}).exclude == ["daisy/3.jpg"]
    with pytest.raises(ValueError, match="split.exclude: entries must be distinct; listed more than once: a.jpg"):
        params.parse_section("split", {"exclude": ["a.jpg", "a.jpg"]})
    with pytest.raises(ValueError, match="split.exclude"):
        params.parse_section("split", {"exclude": "a.jpg"})
