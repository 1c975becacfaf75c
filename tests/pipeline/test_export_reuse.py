"""The head loop's export (issue 15 item 1): the backbone file comes from the conversion cache; the check bites.

One small DVC project (random-init MobileNetV2 alpha 0.35 at 32 px, ``engine: auto`` so that
extract_features converts the backbone and caches the file, logistic head, ``export.keras: false``)
is exported once for the module. A head change then re-exports: the same converted bytes, no
conversion and no TensorFlow in any stage of the loop (``PYTHONPROFILEIMPORTTIME`` lists every
module each stage imports). A head that does not match evaluate's predictions still fails the
export, and an emptied conversion folder is refilled (converted and checked against Keras again).
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from transferlab import cli
from transferlab.data import images
from transferlab.heads import base

pytestmark = pytest.mark.slow

ENVIRONMENT = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@t.invalid",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t.invalid",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}  # module fixtures run before conftest's per-test environment


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The pipeline run to export once, converting the backbone into the project's embedding cache."""
    import support

    root = tmp_path_factory.mktemp("export-reuse")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {**ENVIRONMENT, "TRANSFERLAB_CACHE_DIR": str(root / "unused-cache")}.items():
            patch.setenv(key, value)
        project = support.make_project(root)
        project.set_params(
            extract_features={"engine": "auto"}, export={"tflite": True, "keras": False, "check_images": 0}
        )
        project.dvc("repro", "export")
    return project


def converted_files(project) -> list[Path]:
    return sorted((project.root.parent / "embedding-cache" / "converted").glob("*.tflite"))


def export_command(root: Path, *, model: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "stages/export.py",
        "--features",
        "data/features",
        "--model",
        str(model),
        "--test-predictions",
        "metrics/evaluate/test_predictions.csv",
        "--images",
        "data/raw/images",
        "--out",
        str(out),
        "--metrics",
        str(out.parent / f"{out.name}.json"),
    ]


def test_the_first_export_ships_the_very_file_extract_features_converted(project):
    manifest = json.loads((project.root / "models" / "export" / "manifest.json").read_text())
    assert manifest["layout"] == "stack" and manifest["keras_model"] == "" and manifest["tflite_model"] == ""
    (member,) = manifest["members"]
    assert member["kind"] == "keras" and member["converted_from_keras"] and member["conversion"] == "reused"
    (cached,) = converted_files(project)  # extract_features' conversion, never a second one
    shipped = project.root / "models" / "export" / member["file"]
    assert images.sha256_file(shipped) == images.sha256_file(cached) == member["sha256"]
    assert not (project.root / "models" / "export" / "model.keras").exists()


def test_a_head_change_re_exports_without_converting_or_importing_tensorflow(project):
    project.set_params(train_head={"logistic": {"c_grid": [0.1, 1.0]}})
    # Every Python process of the loop lists the modules it imports on stderr, which dvc shows.
    project.environment = {**project.environment, "PYTHONPROFILEIMPORTTIME": "1"}
    try:
        result = project.dvc("repro", "export")
    finally:
        project.environment.pop("PYTHONPROFILEIMPORTTIME")
    log = result.stdout + result.stderr
    for stage in ("train_head", "evaluate", "export"):
        assert f"Running stage '{stage}'" in log
    assert "Running stage 'extract_features'" not in log
    imported = {line.split("|")[-1].strip() for line in log.splitlines() if line.startswith("import time:")}
    assert "transferlab.export.build" in imported  # the listing is there, and it covers the export stage
    assert not {"tensorflow", "keras"} & imported, sorted({"tensorflow", "keras"} & imported)
    assert "reused the converted mobilenet_v2" in log
    assert len(converted_files(project)) == 1
    root = project.root
    manifest = json.loads((root / "models" / "export" / "manifest.json").read_text())
    assert manifest["members"][0]["conversion"] == "reused"
    assert manifest["head"]["settings"]["c_grid"] == [0.1, 1.0]
    report = json.loads((root / "metrics" / "export.json").read_text())
    assert report["dropped"] == "" and report["formats"]["tflite"]["agreement"] == 1.0
    with (root / "metrics" / "evaluate" / "test_predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert report["checked_images"] == report["selected_images"] == len(rows)  # fewer than check.SAMPLE_IMAGES
    assert report["checked_because"] == "every selected image: no more than the sample"
    # What the check ran is what predict runs: evaluate's classes and confidences, image by image.
    paths = [str(root / "data" / "raw" / "images" / row["path"]) for row in rows]
    outcome = subprocess.run(
        [sys.executable, "-m", "transferlab.cli", "predict", *paths, "--model", "models/export", "--json"],
        cwd=root,
        env=project.environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert outcome.returncode == 0, outcome.stderr
    predicted = [item["predictions"][0] for item in json.loads(outcome.stdout)]
    assert [item["class"] for item in predicted] == [row["predicted"] for row in rows]
    np.testing.assert_allclose(
        [item["confidence"] for item in predicted], [float(row["confidence"]) for row in rows], atol=1e-5
    )


def test_a_broken_head_still_fails_the_check_and_writes_nothing(project, tmp_path):
    root = project.root
    broken = tmp_path / "head"
    shutil.copytree(root / "models" / "head", broken)
    with np.load(broken / "logistic.npz") as arrays:
        coef, intercept = arrays["coef"], arrays["intercept"]
    # Each class gets the next one's weights: the same shapes and blocks, other predictions.
    base.save_arrays(broken / "logistic.npz", coef=np.roll(coef, 1, axis=0), intercept=np.roll(intercept, 1))
    out = tmp_path / "export"
    result = subprocess.run(
        export_command(root, model=broken, out=out),
        cwd=root,
        env=project.environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "no exported format reproduces evaluate's test predictions" in result.stderr
    assert "reused the converted mobilenet_v2" in result.stderr  # the fast path ran, and its check bit
    assert not out.exists() and not (tmp_path / "export.json").exists()


def test_an_emptied_conversion_folder_is_refilled_and_checked(project, tmp_path):
    root = project.root
    for path in converted_files(project):
        path.unlink()
    out = tmp_path / "export"
    result = subprocess.run(
        export_command(root, model=root / "models" / "head", out=out),
        cwd=root,
        env=project.environment,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["members"][0]["conversion"] == "converted"
    (refilled,) = converted_files(project)  # converted, checked against Keras and cached as extract_features does
    assert images.sha256_file(out / manifest["members"][0]["file"]) == images.sha256_file(refilled)
    report = json.loads((tmp_path / "export.json").read_text())
    assert report["formats"]["tflite"]["kept"] and report["formats"]["tflite"]["agreement"] >= 0.99
    assert "new or converted" in report["checked_because"]  # a new file: every selected image runs
    assert cli.main(["predict", str(root / "data" / "raw" / "images"), "--model", str(out)]) == 0
