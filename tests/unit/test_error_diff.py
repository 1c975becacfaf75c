"""The error diff: exact fixed / newly wrong / wrong-in-both sets, matched by sha256, and its files."""

from __future__ import annotations

import subprocess

import numpy as np
from PIL import Image

from transferlab.data import tables
from transferlab.reports import baseline as baseline_module
from transferlab.reports import error_diff


def row(path, sha, actual, predicted, confidence):
    return {"path": path, "sha256": sha, "actual": actual, "predicted": predicted, "confidence": confidence}


# Baseline: a right, b wrong, c wrong, d right, e right, f only here; g twice (byte-identical copies).
BASELINE = [
    row("daisy/a.jpg", "a" * 64, "daisy", "daisy", 0.9),
    row("daisy/b.jpg", "b" * 64, "daisy", "roses", 0.8),
    row("roses/c.jpg", "c" * 64, "roses", "tulips", 0.7),
    row("roses/d.jpg", "d" * 64, "roses", "roses", 0.95),
    row("tulips/e.jpg", "e" * 64, "tulips", "tulips", 0.6),
    row("tulips/f.jpg", "f" * 64, "tulips", "tulips", 0.6),
    row("roses/g1.jpg", "9" * 64, "roses", "daisy", 0.55),
    row("roses/g2.jpg", "9" * 64, "roses", "daisy", 0.55),
]
# New: b fixed, c still wrong (another class), d newly wrong, e moved to another path and newly wrong,
# h only here, g fixed.
NEW = [
    row("daisy/a.jpg", "a" * 64, "daisy", "daisy", 0.91),
    row("daisy/b.jpg", "b" * 64, "daisy", "daisy", 0.85),
    row("roses/c.jpg", "c" * 64, "roses", "daisy", 0.5),
    row("roses/d.jpg", "d" * 64, "roses", "tulips", 0.65),
    row("tulips/renamed-e.jpg", "e" * 64, "tulips", "roses", 0.75),
    row("tulips/h.jpg", "8" * 64, "tulips", "roses", 0.99),
    row("roses/g1.jpg", "9" * 64, "roses", "roses", 0.6),
    row("roses/g2.jpg", "9" * 64, "roses", "roses", 0.6),
]


def test_the_diff_gives_the_exact_fixed_and_introduced_sets():
    diff = error_diff.diff_predictions(BASELINE, NEW)
    assert [change.sha256[0] for change in diff.fixed] == ["b", "9"]  # most confident former mistake first
    assert [change.sha256[0] for change in diff.newly_wrong] == ["e", "d"]  # most confident new mistake first
    assert [change.sha256[0] for change in diff.wrong_in_both] == ["c"]
    assert diff.counts() == {
        "fixed": 2,
        "newly_wrong": 2,
        "wrong_in_both": 1,
        "matched": 6,
        "only_in_baseline": 1,
        "only_in_new": 1,
        "relabelled": 0,
    }
    moved = diff.newly_wrong[0]
    assert (moved.path, moved.actual, moved.baseline_predicted, moved.predicted) == (
        "tulips/renamed-e.jpg",
        "tulips",
        "tulips",
        "roses",
    )
    assert (moved.baseline_confidence, moved.confidence) == (0.6, 0.75)
    assert diff.fixed[1].path == "roses/g1.jpg"  # a duplicate group counts once


def test_a_relabelled_image_is_not_counted_as_fixed():
    relabelled = [dict(item) for item in NEW]
    relabelled[1]["actual"] = relabelled[1]["predicted"] = "tulips"
    diff = error_diff.diff_predictions(BASELINE, relabelled)
    assert "b" * 64 not in {change.sha256 for change in diff.fixed} and diff.relabelled == 1


def test_against_a_committed_baseline_writes_the_csv_and_the_gallery(tmp_path, monkeypatch):
    images = tmp_path / "data" / "raw" / "images"
    for item in NEW:
        (images / item["path"]).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((20, 30, 3), 120, np.uint8)).save(images / item["path"])
    predictions = tmp_path / "metrics" / "evaluate" / "test_predictions.csv"
    tables.write_predictions(BASELINE, predictions)
    for arguments in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "baseline"]):
        subprocess.run(["git", *arguments], cwd=tmp_path, check=True, capture_output=True)
    tables.write_predictions(NEW, predictions)
    monkeypatch.chdir(tmp_path)
    diff, written = error_diff.against_baseline(
        baseline_module.resolve("HEAD"),
        predictions=predictions,
        baseline_predictions="metrics/evaluate/test_predictions.csv",
        images_directory=images,
        out=tmp_path / "gate",
        max_image_pixels=10**6,
    )
    rows = tables.read_error_diff(written[0])
    assert [(item["kind"], item["sha256"][0]) for item in rows] == [
        ("fixed", "b"),
        ("fixed", "9"),
        ("newly_wrong", "e"),
        ("newly_wrong", "d"),
        ("wrong_in_both", "c"),
    ]
    assert rows[0]["baseline_confidence"] == "0.800000" and rows[0]["confidence"] == "0.850000"
    with Image.open(written[1]) as png:
        assert png.width > 300 and png.height > 300
    text = error_diff.markdown(diff)
    assert "2 fixed, 2 newly wrong, 1 wrong in both, of 6 test images matched by sha256." in text
    assert "| `tulips/renamed-e.jpg` | tulips | tulips (0.60) | roses (0.75) |" in text
