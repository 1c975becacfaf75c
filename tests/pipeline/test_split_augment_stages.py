"""The split and augment stage scripts, run as DVC runs them, on a small dataset made here."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

import support
from transferlab.data import augment, images

REPOSITORY = Path(__file__).resolve().parents[2]
CLASSES = {"daisy": 14, "roses": 11, "tulips": 9}
INDEX_COLUMNS = ["path", "label", "sha256", "width", "height", "status", "detail"]


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """A project folder: data/raw/images/<class>/..., data/raw/index.csv and params.yaml."""
    image_root = support.write_dataset(
        tmp_path / "data" / "raw" / "images",
        per_class=CLASSES,
        size=((48, 40), (71, 55), (40, 88)),
        name="{label}_{index:02d}",
        formats=("png", "jpg", "jpg"),
    )
    # A byte-identical copy inside one class, and one photo in two classes (a label conflict).
    (image_root / "daisy" / "daisy_copy.jpg").write_bytes((image_root / "daisy" / "daisy_01.jpg").read_bytes())
    (image_root / "tulips" / "roses_02_again.jpg").write_bytes((image_root / "roses" / "roses_02.jpg").read_bytes())
    (image_root / "roses" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    _write_index(image_root, tmp_path / "data" / "raw" / "index.csv")
    _write_params(
        tmp_path, split={"val_fraction": 0.2, "test_fraction": 0.2}, augment={"copies": 2, "preview_images": 4}
    )
    return tmp_path


def _write_index(image_root: Path, index: Path) -> None:
    rows = []
    for path in sorted(image_root.rglob("*")):
        if path.is_file():
            relative = path.relative_to(image_root).as_posix()
            ok = not path.name.startswith("broken")
            width, height = Image.open(path).size if ok else ("", "")
            rows.append(
                {
                    "path": relative,
                    "label": path.parent.name,
                    "sha256": images.sha256_file(path),
                    "width": width,
                    "height": height,
                    "status": "ok" if ok else "corrupt",
                    "detail": "" if ok else "cannot decode",
                }
            )
    with index.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=INDEX_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _write_params(root: Path, **sections) -> None:
    content = {"base": {"seed": 7}} | sections
    (root / "params.yaml").write_text(yaml.safe_dump(content), encoding="utf-8")


def _run(project: Path, stage: str) -> subprocess.CompletedProcess:
    commands = {
        "split": ["--index", "data/raw/index.csv", "--out", "data/splits", "--metrics", "metrics/split.json"],
        "augment": [
            "--train",
            "data/splits/train.csv",
            "--images",
            "data/raw/images",
            "--out",
            "data/augmented/train.csv",
            "--preview",
            "metrics/augment/preview.png",
        ],
    }
    script = REPOSITORY / "stages" / f"{stage}.py"
    return subprocess.run(
        [sys.executable, str(script), *commands[stage]], cwd=project, capture_output=True, text=True, timeout=120
    )


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def test_split_then_augment(project: Path):
    result = _run(project, "split")
    assert result.returncode == 0, result.stderr
    splits = {}
    for name in ("train", "val", "test"):
        columns, rows = _read(project / "data" / "splits" / f"{name}.csv")
        assert columns == ["path", "label", "sha256"]
        assert [row["path"] for row in rows] == sorted(row["path"] for row in rows)
        splits[name] = rows
    assigned = {row["path"]: name for name, rows in splits.items() for row in rows}
    assert sum(map(len, splits.values())) == len(assigned) == sum(CLASSES.values()) + 1 - 1  # +copy -roses_02
    assert "roses/roses_02.jpg" not in assigned and "tulips/roses_02_again.jpg" not in assigned
    assert "roses/broken.jpg" not in assigned
    assert assigned["daisy/daisy_01.jpg"] == assigned["daisy/daisy_copy.jpg"]

    report = json.loads((project / "metrics" / "split.json").read_text())
    assert report["classes"]["daisy"]["total"] == 15 and report["classes"]["roses"]["total"] == 10
    for label, counts in report["classes"].items():
        assert counts["val"] >= 1 and counts["test"] >= 1 and counts["train"] >= 1
        assert counts["train"] == sum(row["label"] == label for row in splits["train"])
    assert report["label_conflicts"][0]["paths"] == ["roses/roses_02.jpg", "tulips/roses_02_again.jpg"]
    assert report["dropped"]["not_ok"] == {"corrupt": 1}

    result = _run(project, "augment")
    assert result.returncode == 0, result.stderr
    columns, rows = _read(project / "data" / "augmented" / "train.csv")
    assert columns == ["path", "label", "sha256", "recipe"]
    assert len(rows) == 3 * len(splits["train"])
    assert [row["path"] for row in rows if row["recipe"] == ""] == [row["path"] for row in splits["train"]]
    for row in rows:
        if row["recipe"]:
            assert augment.Recipe.from_string(row["recipe"]).to_string() == row["recipe"]
    preview = Image.open(project / "metrics" / "augment" / "preview.png")
    assert preview.format == "PNG" and preview.width >= 3 * 160 and preview.height >= 4 * 160

    # Re-running gives byte-identical outputs.
    first = {path: path.read_bytes() for path in (project / "data").rglob("*.csv") if "raw" not in path.parts}
    assert _run(project, "split").returncode == 0 and _run(project, "augment").returncode == 0
    assert first == {path: path.read_bytes() for path in first}


def test_augment_with_copies_zero_lists_originals_and_still_previews(project: Path):
    _write_params(
        project, split={"val_fraction": 0.2, "test_fraction": 0.2}, augment={"copies": 0, "preview_images": 2}
    )
    assert _run(project, "split").returncode == 0
    result = _run(project, "augment")
    assert result.returncode == 0, result.stderr
    _, rows = _read(project / "data" / "augmented" / "train.csv")
    assert rows and all(row["recipe"] == "" for row in rows)
    assert Image.open(project / "metrics" / "augment" / "preview.png").width > 2 * 160


def test_bad_split_params_name_the_key_and_write_nothing(project: Path):
    _write_params(project, split={"val_fraction": 0.7, "test_fraction": 0.4})
    result = _run(project, "split")
    assert result.returncode == 1
    assert "split" in result.stderr and "val_fraction" in result.stderr and "Traceback" not in result.stderr
    assert not (project / "data" / "splits").exists() and not (project / "metrics" / "split.json").exists()


def test_bad_augment_params_name_the_key(project: Path):
    assert _run(project, "split").returncode == 0
    _write_params(project, augment={"rotation": 400.0})
    result = _run(project, "augment")
    assert result.returncode == 1 and "augment.rotation" in result.stderr
    assert not (project / "data" / "augmented").exists()


def test_class_too_small_for_the_split_is_a_clear_error(project: Path):
    _write_params(project, split={"val_fraction": 0.45, "test_fraction": 0.45})
    result = _run(project, "split")
    assert result.returncode == 1
    assert "class 'roses' has 10 usable image(s)" in result.stderr and "split.val_fraction" in result.stderr
    assert "class 'daisy'" not in result.stderr and "class 'tulips'" not in result.stderr  # 15 and 9 images: fine


def test_missing_or_malformed_index_is_a_clear_error(project: Path):
    index = project / "data" / "raw" / "index.csv"
    index.write_text("path,label\ndaisy/a.jpg,daisy\n")
    result = _run(project, "split")
    assert result.returncode == 1 and "lacks column(s) sha256, status" in result.stderr
    index.unlink()
    result = _run(project, "split")
    assert result.returncode == 1 and "not found" in result.stderr and "download" in result.stderr


def test_augment_needs_the_train_split(project: Path):
    result = _run(project, "augment")
    assert result.returncode == 1 and "run the split stage first" in result.stderr


def test_old_splits_survive_a_failed_rerun(project: Path):
    assert _run(project, "split").returncode == 0
    before = (project / "data" / "splits" / "train.csv").read_bytes()
    _write_params(project, split={"val_fraction": 0.45, "test_fraction": 0.45})
    assert _run(project, "split").returncode == 1
    assert (project / "data" / "splits" / "train.csv").read_bytes() == before
    assert sorted(path.name for path in (project / "data").iterdir()) == ["raw", "splits"]  # no temporary left
