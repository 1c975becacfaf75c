"""extract_features: the embedding cache in use, stacks, resuming, concurrency, engines."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import support
from transferlab.backbones import stack
from transferlab.core import params
from transferlab.features import extract_features

pytestmark = pytest.mark.slow
SMALL = support.SMALL_PARAMS["extract_features"]


def run_extraction(folder: Path, rows: list[dict], cache: Path | None, **settings):
    values = {**SMALL, **settings}
    members = stack.resolve_members(params.parse_section("extract_features", values), seed=0)
    splits = {"train": rows[::2], "val": rows[1::4], "test": rows[3::4]}
    return extract_features.extract_features(
        members=members,
        rows_by_split=splits,
        images_directory=folder,
        cache_directory=cache,
        engine=values.get("engine", "auto"),
        batch_size=values["batch_size"],
        threads=2,
        seed=0,
        max_image_pixels=10**8,
    )


@pytest.fixture()
def dataset(tmp_path):
    folder = support.write_dataset(tmp_path / "photos", per_class=8)
    return folder, support.rows_for(folder)


def test_hit_after_miss_and_identical_features_without_the_cache(dataset, tmp_path):
    folder, rows = dataset
    cold, cold_report = run_extraction(folder, rows, tmp_path / "cache")
    warm, warm_report = run_extraction(folder, rows, tmp_path / "cache")
    uncached, uncached_report = run_extraction(folder, rows, None)

    assert cold_report["embedded"] == len(rows) and cold_report["cache_hits"] == 0
    assert warm_report["embedded"] == 0 and warm_report["cache_hits"] == len(rows)
    assert uncached_report["cache"] == "disabled" and uncached_report["embedded"] == len(rows)
    assert (
        cold_report["random_init"] is True
        and cold_report["backbones"]["mobilenet_v2"]["weights"] == "random-init-seed0"
    )
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(cold[split].arrays["features"], warm[split].arrays["features"])
        np.testing.assert_array_equal(cold[split].arrays["features"], uncached[split].arrays["features"])
        assert np.isfinite(cold[split].arrays["features"]).all()
    train = cold["train"].arrays
    assert train["features"].shape == (len(rows[::2]), 1280)
    assert list(train["class_names"]) == ["daisy", "roses", "tulips"]
    assert list(train["block_specs"]) == ["mobilenet_v2"] and list(train["block_widths"]) == [1280]


def test_a_stack_is_the_concatenation_of_its_members_and_adding_one_embeds_only_it(dataset, tmp_path):
    folder, rows = dataset
    cache = tmp_path / "cache"
    alone, _ = run_extraction(folder, rows, cache)
    other, _ = run_extraction(folder, rows, tmp_path / "other-cache", backbone="mobilenet", alpha=0.25)
    stacked, report = run_extraction(
        folder, rows, cache, backbone=["mobilenet_v2", "mobilenet"], alpha={"mobilenet_v2": 0.35, "mobilenet": 0.25}
    )

    by_name = report["backbones"]
    assert by_name["mobilenet_v2"]["embedded"] == 0 and by_name["mobilenet_v2"]["cache_hits"] == len(rows)
    assert by_name["mobilenet"]["embedded"] == len(rows)
    for split in ("train", "val", "test"):
        expected = np.concatenate([alone[split].arrays["features"], other[split].arrays["features"]], axis=1)
        np.testing.assert_array_equal(stacked[split].arrays["features"], expected)
    train = stacked["train"].arrays
    assert list(train["block_widths"]) == [1280, 256] and list(train["block_offsets"]) == [0, 1280]

    _, removed = run_extraction(folder, rows, cache, backbone="mobilenet", alpha=0.25)
    assert removed["embedded"] == 0


def test_a_corrupt_entry_is_recomputed_not_served(dataset, tmp_path):
    folder, rows = dataset
    clean, _ = run_extraction(folder, rows, tmp_path / "cache")
    (database,) = (tmp_path / "cache").glob("*/*.sqlite")
    with sqlite3.connect(database) as connection:
        blob = bytearray(connection.execute("SELECT data FROM entries LIMIT 1").fetchone()[0])
        blob[10] ^= 0xFF
        connection.execute(
            "UPDATE entries SET data = ? WHERE rowid = (SELECT rowid FROM entries LIMIT 1)", (bytes(blob),)
        )
    again, report = run_extraction(folder, rows, tmp_path / "cache")
    assert report["backbones"]["mobilenet_v2"]["corrupt_entries_recomputed"] == 1
    assert report["embedded"] == 1
    np.testing.assert_array_equal(clean["train"].arrays["features"], again["train"].arrays["features"])


def test_bad_settings_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="more than once"):
        stack.resolve_members(
            params.parse_section("extract_features", {**SMALL, "backbone": ["mobilenet_v2", "mobilenet_v2"]}), seed=0
        )
    with pytest.raises(ValueError, match="neither in the stack nor a registered backbone"):
        stack.resolve_members(params.parse_section("extract_features", {**SMALL, "alpha": {"resnet5": 1.0}}), seed=0)
    # A mapping may name other registry backbones: one params.yaml serves a whole comparison.
    assert (
        stack.resolve_members(
            params.parse_section("extract_features", {**SMALL, "alpha": {"mobilenet_v2": 0.35, "mobilenet": 0.25}}),
            seed=0,
        )[0].alpha
        == 0.35
    )
    with pytest.raises(ValueError, match="weights file not found"):
        stack.resolve_members(
            params.parse_section("extract_features", {**SMALL, "weights": "missing/weights.h5"}), seed=0
        )
    with pytest.raises(ValueError, match="choose one of"):
        stack.resolve_members(params.parse_section("extract_features", {**SMALL, "backbone": "resnet5"}), seed=0)


# ---------------------------------------------------------------- the stage as a process


def stage_workspace(tmp_path: Path, per_class: int) -> Path:
    """A folder laid out as the stage expects, with params for a slow-enough run to interrupt."""
    root = tmp_path / "workspace"
    folder = support.write_dataset(root / "data" / "raw" / "images", per_class=per_class)
    rows = support.rows_for(folder)
    splits = {"train": rows[::2], "val": rows[1::4], "test": rows[3::4]}
    for split, split_rows in splits.items():
        target = root / ("data/augmented/train.csv" if split == "train" else f"data/splits/{split}.csv")
        target.parent.mkdir(parents=True, exist_ok=True)
        lines = ["path,label,sha256,recipe"] + [f"{r['path']},{r['label']},{r['sha256']}," for r in split_rows]
        target.write_text("\n".join(lines) + "\n")
    settings = {**SMALL, "batch_size": 1, "engine": "keras", "cache_dir": str(tmp_path / "cache")}
    (root / "params.yaml").write_text(yaml.safe_dump({"base": {"seed": 0}, "extract_features": settings}))
    (root / "dvc.yaml").write_text("stages: {}\n")
    return root


def cached_rows(cache: Path) -> int:
    total = 0
    for database in cache.glob("*/*.sqlite"):
        with sqlite3.connect(database, timeout=30) as connection:
            total += connection.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
    return total


def test_a_killed_run_resumes_where_it_stopped(tmp_path):
    root = stage_workspace(tmp_path, per_class=40)
    total = 120
    process = subprocess.Popen(
        support.extract_features_command(), cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while cached_rows(tmp_path / "cache") < 10 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = cached_rows(tmp_path / "cache")
    assert 10 <= done < total, f"could not interrupt the run mid-way ({done} of {total} cached)"
    assert not (root / "data" / "features").exists(), "a killed run must not leave features behind"

    subprocess.run(support.extract_features_command(), cwd=root, check=True, capture_output=True)
    report = json.loads((root / "metrics" / "extract_features.json").read_text())
    assert report["cache_hits"] >= done and report["embedded"] == total - report["cache_hits"]
    features = np.load(root / "data" / "features" / "train.npz", allow_pickle=False)["features"]
    assert features.shape == (60, 1280) and np.isfinite(features).all()


def test_two_runs_filling_the_cache_at_once_both_succeed(tmp_path):
    root = stage_workspace(tmp_path, per_class=10)
    commands = [support.extract_features_command(out=f"out{index}", metrics=f"metrics{index}.json") for index in (1, 2)]
    processes = [
        subprocess.Popen(command, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for command in commands
    ]
    for process in processes:
        _, errors = process.communicate(timeout=600)
        assert process.returncode == 0, errors[-3000:]
    for split in ("train", "val", "test"):
        first = np.load(root / "out1" / f"{split}.npz", allow_pickle=False)["features"]
        second = np.load(root / "out2" / f"{split}.npz", allow_pickle=False)["features"]
        np.testing.assert_array_equal(first, second)
    assert cached_rows(tmp_path / "cache") == 30
