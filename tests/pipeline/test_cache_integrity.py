"""The cache folder on real conversions: damaged files are recomputed, unusable folders are skipped.

Issue 14, items 1 and 5: a converted model with 4 KB of flipped bytes was loaded and its wrong
embeddings stored under the good model's key; a read-only cache folder or ``cache_dir:
/proc/self`` gave sqlite3/OSError tracebacks.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

import support
from transferlab.backbones import stack
from transferlab.core import params
from transferlab.features import cache_files, engine_choice, extract_features

pytestmark = pytest.mark.slow
SMALL = support.SMALL_PARAMS["extract_features"]


def run_extraction(folder: Path, rows: list[dict], cache: Path | None, engine: str = "auto"):
    members = stack.resolve_members(params.parse_section("extract_features", SMALL), seed=0)
    splits = {"train": rows[::2], "val": rows[1::4], "test": rows[3::4]}
    return extract_features.extract_features(
        members=members,
        rows_by_split=splits,
        images_directory=folder,
        cache_directory=cache,
        engine=engine,
        batch_size=SMALL["batch_size"],
        threads=2,
        seed=0,
        max_image_pixels=10**8,
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = support.write_dataset(tmp_path_factory.mktemp("photos") / "photos", per_class=6)
    return folder, support.rows_for(folder)


def features_of(feature_sets) -> np.ndarray:
    return np.concatenate([feature_sets[split].arrays["features"] for split in ("train", "val", "test")])


def flip_4_kb(path: Path) -> None:
    """Flips 4 KB in the middle of the file, among the weights: the model still loads and runs."""
    content = bytearray(path.read_bytes())
    middle = len(content) // 2
    content[middle : middle + 4096] = bytes(byte ^ 0xFF for byte in content[middle : middle + 4096])
    path.write_bytes(bytes(content))


def keras_verdicts(cache: Path) -> list[Path]:
    """The converted backbones' verdicts (not the per-CPU batch records beside them)."""
    return [path for path in (cache / "converted").glob("*.json") if not path.name.endswith("-batch.json")]


def forget_embeddings(cache: Path) -> None:
    for database in cache.glob("*/*.sqlite*"):
        database.unlink()


def test_a_damaged_converted_model_or_verdict_is_recomputed_and_gives_the_undamaged_features(dataset, tmp_path, caplog):
    folder, rows = dataset
    cache = tmp_path / "cache"
    clean, report = run_extraction(folder, rows, cache)
    assert report["backbones"]["mobilenet_v2"]["engine"] == "tflite"
    (model,) = (cache / "converted").glob("*.tflite")
    (verdict,) = keras_verdicts(cache)

    forget_embeddings(cache)  # so the run must embed everything again, with whatever model it loads
    flip_4_kb(model)
    with caplog.at_level(logging.WARNING):
        repaired, report = run_extraction(folder, rows, cache)
    assert f"Cache file {model} does not match the sha256 recorded in {verdict.name}" in caplog.text
    assert "reconverting" in caplog.text
    assert report["embedded"] == len(rows) and not model.exists(), "the damaged file is removed"
    (reconverted,) = (cache / "converted").glob("*.tflite")
    assert cache_files.file_sha256(reconverted) == json.loads(verdict.read_text())["tflite_sha256"]
    np.testing.assert_array_equal(features_of(repaired), features_of(clean))

    forget_embeddings(cache)
    caplog.clear()
    verdict.write_text("garbage")
    with caplog.at_level(logging.WARNING):
        again, _ = run_extraction(folder, rows, cache)
    assert f"Cache file {verdict} is not valid JSON" in caplog.text and "converting and checking" in caplog.text
    np.testing.assert_array_equal(features_of(again), features_of(clean))


def test_rows_of_a_damaged_model_that_slipped_through_never_reach_the_good_key(dataset, tmp_path):
    folder, rows = dataset
    cache = tmp_path / "cache"
    clean, _ = run_extraction(folder, rows, cache)
    (model,) = (cache / "converted").glob("*.tflite")
    (verdict_path,) = keras_verdicts(cache)
    good_model, good_verdict = model.read_bytes(), verdict_path.read_text()

    flip_4_kb(model)  # and forge the record, as if the damage had happened before it was written
    damaged_sha256 = cache_files.file_sha256(model)
    model.rename(engine_choice.converted_model_path(verdict_path, damaged_sha256))
    cache_files.write_record(verdict_path, {**json.loads(good_verdict), "tflite_sha256": damaged_sha256})
    slipped, report = run_extraction(folder, rows, cache)
    assert report["cache_hits"] == 0 and report["embedded"] == len(rows), "the good rows were served to it"
    assert not np.array_equal(features_of(slipped), features_of(clean)), "the damage changed nothing: test is void"
    assert len(list(cache.glob("*/*.sqlite"))) == 2

    model.write_bytes(good_model)
    verdict_path.write_text(good_verdict)
    restored, report = run_extraction(folder, rows, cache)
    assert report["cache_hits"] == len(rows) and report["embedded"] == 0
    np.testing.assert_array_equal(features_of(restored), features_of(clean))


# ---------------------------------------------------------------- unusable cache folders


@pytest.fixture()
def read_only_folder(tmp_path):
    """A folder nothing can be created in, even by root (chattr +i; chmod only stops other users)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
    elif subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("root cannot make a read-only folder on this file system (chattr +i refused)")
    yield folder
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o755)


@pytest.mark.parametrize("where", ["/proc/self", "a file in its place", "read-only"])
def test_an_unusable_cache_folder_gives_one_warning_and_the_uncached_features(
    dataset, tmp_path, request, caplog, where
):
    folder, rows = dataset
    # Keras, not a conversion: which engine runs does not change how the folder is checked.
    uncached, _ = run_extraction(folder, rows, None, engine="keras")
    if where == "/proc/self":
        cache = Path("/proc/self")
    elif where == "read-only":
        cache = request.getfixturevalue("read_only_folder")
    else:
        cache = tmp_path / "cache"
        cache.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING):
        features, report = run_extraction(folder, rows, cache, engine="keras")
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    about_the_cache = [message for message in warnings if str(cache) in message]
    assert len(about_the_cache) == 1, warnings
    assert "cannot be used" in about_the_cache[0] and "running without the cache" in about_the_cache[0]
    assert report["cache"] == f"unusable: {cache}" and report["embedded"] == len(rows)
    np.testing.assert_array_equal(features_of(features), features_of(uncached))


def test_the_stage_with_cache_dir_proc_self_runs_with_a_warning_not_a_traceback(tmp_path):
    root = tmp_path / "workspace"
    folder = support.write_dataset(root / "images", per_class=3)
    rows = support.rows_for(folder)
    for name, split_rows in {
        "augmented/train.csv": rows[::2],
        "splits/val.csv": rows[1::4],
        "splits/test.csv": rows[3::4],
    }.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        lines = ["path,label,sha256,recipe"] + [f"{row['path']},{row['label']},{row['sha256']}," for row in split_rows]
        target.write_text("\n".join(lines) + "\n")
    settings = {**SMALL, "engine": "keras", "cache_dir": "/proc/self"}
    (root / "params.yaml").write_text(yaml.safe_dump({"base": {"seed": 0}, "extract_features": settings}))
    (root / "dvc.yaml").write_text("stages: {}\n")
    result = subprocess.run(
        support.extract_features_command(
            images="images", splits="splits", augmented="augmented/train.csv", out="features", metrics="metrics.json"
        ),
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "OperationalError" not in result.stderr
    assert "embedding cache folder /proc/self cannot be used" in result.stderr
    assert json.loads((root / "metrics.json").read_text())["cache"] == "unusable: /proc/self"
