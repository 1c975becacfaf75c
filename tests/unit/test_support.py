"""The tests' one dataset generator: its defaults, and the odd sizes and names later tests rely on."""

from __future__ import annotations

from PIL import Image

import support


def test_default_dataset_is_three_colour_classes_of_distinct_jpegs(tmp_path):
    folder = support.write_dataset(tmp_path / "photos", per_class=2)
    rows = support.rows_for(folder)
    assert [row["path"] for row in rows] == [
        f"{label}/{label}_{index:03d}.jpg" for label in support.CLASS_COLOURS for index in range(2)
    ]
    assert len({row["sha256"] for row in rows}) == len(rows)
    assert {Image.open(folder / row["path"]).size for row in rows} == {(48, 40)}


def test_odd_sizes_names_formats_and_counts_per_class(tmp_path):
    folder = support.write_dataset(
        tmp_path / "photos",
        per_class={"daisy": 4, "wild roses": 2},
        size=support.ODD_SIZES,
        name=support.ODD_NAME,
        formats=("jpg", "png"),
    )
    rows = support.rows_for(folder)
    assert [row["label"] for row in rows] == ["daisy"] * 4 + ["wild roses"] * 2
    opened = [Image.open(folder / row["path"]) for row in rows]
    assert [image.size for image in opened[:4]] == list(support.ODD_SIZES)
    assert [image.format for image in opened[:4]] == ["JPEG", "PNG", "JPEG", "PNG"]
    assert all(" " in row["path"] and not row["path"].isascii() for row in rows)
