"""The CSV contracts between stages: each writer's file reads back through its reader; bad files say what to do."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from transferlab.data import tables


def header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as handle:
        return next(csv.reader(handle))


def ok_row(path: str, sha: str = "ab" * 32) -> tables.IndexRow:
    return tables.IndexRow(path, path.split("/")[0], sha, 40, 30, "ok", "")


# ---------------------------------------------------------------------------------- index


def test_index_round_trip(tmp_path):
    path = tmp_path / "raw" / "index.csv"
    rows = [ok_row("a/1.jpg"), tables.IndexRow("b/x.txt", "b", "ff", None, None, "not-an-image", "why, then")]
    tables.write_index(rows, path)
    assert (
        header(path) == list(tables.INDEX_COLUMNS) == ["path", "label", "sha256", "width", "height", "status", "detail"]
    )
    assert tables.read_index(path) == [row.as_csv() for row in rows]
    assert tables.read_index(path)[1]["width"] == ""  # unknown size: empty, not "None"


def test_write_index(tmp_path):
    path = tmp_path / "raw" / "index.csv"
    rows = [
        ok_row('a/1,odd "name".jpg'),
        tables.IndexRow("b/x.txt", "b", "ff", None, None, "not-an-image", "why, then"),
    ]
    tables.write_index(rows, path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "path,label,sha256,width,height,status,detail"
    assert lines[2] == 'b/x.txt,b,ff,,,not-an-image,"why, then"'
    assert [r["path"] for r in csv.DictReader(path.open(encoding="utf-8"))] == ['a/1,odd "name".jpg', "b/x.txt"]


def test_index_errors_name_the_download_stage(tmp_path):
    path = tmp_path / "index.csv"
    with pytest.raises(ValueError, match=r"index .*index\.csv not found; run the download stage first"):
        tables.read_index(path)
    path.write_text("path,label\ndaisy/a.jpg,daisy\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) sha256, status \(has: path, label\); re-run the download"):
        tables.read_index(path)


# ---------------------------------------------------------------------------------- splits


SPLITS = {
    "train": [{"path": "a/1.jpg", "label": "a", "sha256": "11"}, {"path": "b/2.jpg", "label": "b", "sha256": "22"}],
    "val": [{"path": "a/3.jpg", "label": "a", "sha256": "33"}],
    "test": [],
}


def test_splits_round_trip(tmp_path):
    folder = tmp_path / "splits"
    tables.write_splits(SPLITS, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["test.csv", "train.csv", "val.csv"]
    assert all(header(folder / f"{name}.csv") == list(tables.SPLIT_COLUMNS) for name in SPLITS)
    assert tables.read_split(folder / "train.csv") == SPLITS["train"]
    assert tables.read_views(folder / "val.csv") == [SPLITS["val"][0] | {"recipe": ""}]


def test_a_failed_splits_write_keeps_the_old_folder(tmp_path):
    folder = tmp_path / "splits"
    tables.write_splits(SPLITS, folder)
    before = (folder / "train.csv").read_bytes()
    with pytest.raises(ValueError):  # a row with a column the contract does not have
        tables.write_splits({"train": [SPLITS["train"][0] | {"status": "ok"}]}, folder)
    assert (folder / "train.csv").read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["splits"]


def test_split_errors_name_the_split_stage(tmp_path):
    path = tmp_path / "train.csv"
    with pytest.raises(ValueError, match=r"train split .*train\.csv not found; run the split stage first"):
        tables.read_split(path)
    path.write_text("path,label\na/1.jpg,a\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) sha256 .*re-run the split stage"):
        tables.read_split(path)
    path.write_text("path,label,sha256\n")
    with pytest.raises(ValueError, match=r"has no images; check the split stage's metrics/split\.json"):
        tables.read_split(path)


# ---------------------------------------------------------------------------------- recipes


def test_recipes_round_trip(tmp_path):
    path = tmp_path / "augmented" / "train.csv"
    rows = [SPLITS["train"][0] | {"recipe": ""}, SPLITS["train"][0] | {"recipe": '{"flip":true,"zoom":0.9}'}]
    tables.write_recipes(rows, path)
    assert header(path) == list(tables.RECIPE_COLUMNS) == ["path", "label", "sha256", "recipe"]
    assert tables.read_views(path) == rows


def test_view_errors_name_the_split_and_augment_stages(tmp_path):
    path = tmp_path / "train.csv"
    with pytest.raises(ValueError, match=r"not found; run the split and augment stages first \(dvc repro augment\)"):
        tables.read_views(path)
    path.write_text("path,recipe\na/1.jpg,\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) label, sha256 .*dvc repro augment"):
        tables.read_views(path)


# ---------------------------------------------------------------------------------- test predictions


def test_predictions_round_trip(tmp_path):
    path = tmp_path / "evaluate" / "test_predictions.csv"
    rows = [{"path": "a/1.jpg", "sha256": "11", "actual": "a", "predicted": "b", "confidence": 0.123456789}]
    tables.write_predictions(rows, path)
    assert header(path) == list(tables.PREDICTION_COLUMNS)
    assert tables.read_predictions(path) == [rows[0] | {"confidence": "0.123457"}]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, r"not found; run the evaluate stage first \(dvc repro evaluate\)"),
        ("path,sha256,actual\n", r"lacks column\(s\) predicted, confidence .*re-run evaluate"),
        ("path,sha256,predicted,confidence\n", r"has no rows; evaluate needs test images"),
    ],
)
def test_prediction_errors_name_the_evaluate_stage(tmp_path, content, message):
    path = tmp_path / "test_predictions.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        tables.read_predictions(path)
