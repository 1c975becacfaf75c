"""export through `dvc repro` on a generated dataset, then `transferlab predict` on what it wrote.

One small pipeline (random-init MobileNetV2 alpha 0.35 at 32 px, logistic head) is run once for
the module: first with the Keras backbone alone (model.keras + model.tflite), then as a stack
with a TFLite backbone that the test converts from a tiny Keras model (the TFLite-files layout).
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
import yaml
from PIL import Image

from transferlab import cli
from transferlab.data import images
from transferlab.features import engines

pytestmark = pytest.mark.slow

EXPORT_STAGE = {
    "cmd": "python stages/export.py --features data/features --model models/head --test-predictions "
           "metrics/evaluate/test_predictions.csv --images data/raw/images --out models/export --metrics metrics/export.json",
    "deps": ["stages/export.py", "src/transferlab/export.py", "src/transferlab/predict.py", "data/features", "models/head",
             "metrics/evaluate/test_predictions.csv", "data/raw/images"],
    "params": ["base", "extract_features.backbone", "extract_features.alpha", "extract_features.weights",
               "extract_features.image_size", "export"],
    "outs": ["models/export"],
    "metrics": [{"metrics/export.json": {"cache": False}}],
}


def ensure_export_stage(root: Path) -> None:
    """Adds the export stage (as README/dvc.yaml give it) to the project's dvc.yaml when it has none yet."""
    pipeline = yaml.safe_load((root / "dvc.yaml").read_text())
    if "export" not in pipeline["stages"]:
        pipeline["stages"]["export"] = EXPORT_STAGE
        (root / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))


def snapshot(root: Path, name: str, destination: Path) -> Path:
    """Copies models/export, the metrics and evaluate's predictions aside (the project moves on)."""
    target = destination / name
    shutil.copytree(root / "models" / "export", target / "export")
    shutil.copy(root / "metrics" / "export.json", target / "export.json")
    shutil.copy(root / "metrics" / "evaluate" / "test_predictions.csv", target / "test_predictions.csv")
    return target


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Runs the pipeline to export twice: a Keras backbone, then a stack with a TFLite member."""
    import support

    base = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t.invalid", "GIT_COMMITTER_NAME": "t",
                           "GIT_COMMITTER_EMAIL": "t@t.invalid", "TF_CPP_MIN_LOG_LEVEL": "2",
                           "TRANSFERLAB_CACHE_DIR": str(base / "cache")}.items():
            patch.setenv(key, value)
        project = support.make_project(base)
        ensure_export_stage(project.root)
        # The image size limit is a param: the manifest must record this value, not a default.
        project.set_params(export={"tflite": True, "check_images": 0}, download={"max_image_pixels": 40_000_000})
        project.dvc("repro", "export")
        keras_run = snapshot(project.root, "keras", base)
        tiny_tflite(project.root / "tiny.tflite")
        project.set_params(extract_features={"backbone": ["mobilenet_v2", "tflite:tiny.tflite"]})
        project.dvc("repro", "export")
        stack_run = snapshot(project.root, "stack", base)
    return {"project": project, "keras": keras_run, "stack": stack_run, "images": project.root / "data" / "raw" / "images"}


def tiny_tflite(path: Path) -> Path:
    """A 16-px TFLite feature extractor (conv + average pool), converted from Keras here."""
    import keras

    keras.utils.set_random_seed(0)
    pixels = keras.Input((16, 16, 3))
    scaled = keras.layers.Rescaling(1 / 255.0)(pixels)
    mapped = keras.layers.Conv2D(8, 3, activation="relu")(scaled)
    return engines.convert_to_tflite(keras.Model(pixels, keras.layers.GlobalAveragePooling2D()(mapped)), path)


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_model_keras_loads_safely_and_reproduces_evaluate(exported):
    import keras

    run, rows = exported["keras"], read_rows(exported["keras"] / "test_predictions.csv")
    folder = run / "export"
    manifest = json.loads((folder / "manifest.json").read_text())
    class_names = (folder / "labels.txt").read_text().splitlines()
    assert manifest["layout"] == "classifier" and manifest["class_names"] == class_names == ["daisy", "roses", "tulips"]
    assert manifest["max_image_pixels"] == 40_000_000  # params download.max_image_pixels
    model = keras.saving.load_model(folder / "model.keras", safe_mode=True)  # no transferlab code needed
    assert model.input_shape == (None, None, None, 3) and model.output_shape == (None, 3)
    for row in rows:
        raw = np.asarray(images.open_rgb(exported["images"] / row["path"], max_image_pixels=10**8))[None]
        probabilities = np.asarray(model(raw))[0]
        assert class_names[int(np.argmax(probabilities))] == row["predicted"], row["path"]
        assert probabilities[class_names.index(row["predicted"])] == pytest.approx(float(row["confidence"]), abs=2e-3)
    bigger = np.asarray(Image.fromarray(raw[0]).resize((300, 200)))[None]  # any size goes in
    assert np.asarray(model(bigger)).sum() == pytest.approx(1.0, abs=1e-5)


def test_export_metrics_report_agreement_sizes_latency_and_provenance(exported):
    run = exported["keras"]
    report = json.loads((run / "export.json").read_text())
    assert set(report["formats"]) == {"keras", "tflite"}
    assert report["checked_images"] == len(read_rows(run / "test_predictions.csv"))
    for figures in report["formats"].values():
        assert figures["top1_agreement"] >= 0.99 and figures["latency_ms"] > 0
    assert report["formats"]["tflite"]["max_confidence_difference"] < 1e-4  # same resize as the pipeline
    assert report["resize"]["keras_max_abs_difference"] <= 1.0  # in-graph resize vs Pillow, grey levels
    for name in ("model.keras", "model.tflite", "labels.txt", "head/head.json"):
        assert report["files"][name] == (run / "export" / name).stat().st_size
    assert report["files"]["total"] == sum(size for name, size in report["files"].items() if name != "total")
    origin = report["provenance"]
    assert origin["head"] == "logistic" and origin["random_init"] is True
    assert origin["members"][0] | {"weights": None} == {
        "name": "mobilenet_v2", "spec": "mobilenet_v2", "kind": "keras", "image_size": 32, "alpha": 0.35,
        "weights": None, "random_init": True, "width": 1280,
    }


def test_predict_classifies_a_folder_and_reports_a_corrupt_and_a_non_image_file(exported, tmp_path, capsys):
    run, rows = exported["keras"], read_rows(exported["keras"] / "test_predictions.csv")
    folder = tmp_path / "new photos"
    (folder / "more").mkdir(parents=True)
    expected = {}
    for index, row in enumerate(rows[:4]):
        target = folder / ("more" if index % 2 else "") / f"photo{index}.jpg"
        shutil.copy(exported["images"] / row["path"], target)
        expected[str(target)] = row["predicted"]
    (folder / "broken.jpg").write_bytes((exported["images"] / rows[0]["path"]).read_bytes()[:300])
    (folder / "notes.txt").write_text("not a photo")
    for format in ("tflite", "keras"):
        code = cli.main(["predict", str(folder), "--model", str(run / "export"), "--json", "--top", "2", "--format", format])
        out, err = capsys.readouterr()
        assert code == 1, format
        results = {item["path"]: item for item in json.loads(out)}
        assert {path: item["predictions"][0]["class"] for path, item in results.items() if "predictions" in item} == expected
        assert all(len(item["predictions"]) == 2 for item in results.values() if "predictions" in item)
        assert "corrupt or unreadable image" in results[str(folder / "broken.jpg")]["error"]
        assert "not an image" in results[str(folder / "notes.txt")]["error"]
        assert f"{folder / 'broken.jpg'}: corrupt" in err and f"{folder / 'notes.txt'}: not an image" in err
        assert "2 of 6 file(s) could not be classified" in err


def test_predict_opens_images_with_the_limit_the_manifest_records(exported, tmp_path, capsys):
    run, rows = exported["keras"], read_rows(exported["keras"] / "test_predictions.csv")
    photo = exported["images"] / rows[0]["path"]
    with Image.open(photo) as image:
        pixels = image.width * image.height
    export = shutil.copytree(run / "export", tmp_path / "export")
    manifest = json.loads((export / "manifest.json").read_text())
    (export / "manifest.json").write_text(json.dumps({**manifest, "max_image_pixels": pixels - 1}))
    assert cli.main(["predict", str(photo), "--model", str(export), "--json"]) == 1
    assert "too large" in json.loads(capsys.readouterr().out)[0]["error"]
    del manifest["max_image_pixels"]  # an export from before the manifest recorded it: the params default
    (export / "manifest.json").write_text(json.dumps(manifest))
    assert cli.main(["predict", str(photo), "--model", str(export), "--json"]) == 0


def test_predict_command_line_prints_one_line_per_image(exported, tmp_path):
    run, rows = exported["keras"], read_rows(exported["keras"] / "test_predictions.csv")
    photo = tmp_path / "photo.jpg"
    shutil.copy(exported["images"] / rows[0]["path"], photo)
    result = subprocess.run([sys.executable, "-m", "transferlab.cli", "predict", str(photo), "--model", str(run / "export")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{photo}: {rows[0]['predicted']} ")


def test_a_stack_with_a_tflite_backbone_exports_as_tflite_files(exported, tmp_path, capsys):
    run, rows = exported["stack"], read_rows(exported["stack"] / "test_predictions.csv")
    folder = run / "export"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["layout"] == "stack" and not (folder / "model.keras").exists()
    first, second = manifest["members"]
    assert (first["kind"], first["converted_from_keras"], first["image_size"], first["width"], first["offset"]) == ("keras", True, 32, 1280, 0)
    assert (second["kind"], second["image_size"], second["width"], second["offset"]) == ("tflite", 16, 8, 1280)
    copied = folder / second["file"]
    assert copied.read_bytes() == (exported["project"].root / "tiny.tflite").read_bytes()
    assert second["sha256"] == second["weights"] == images.sha256_file(copied)
    assert set(manifest["files"]) >= {first["file"], second["file"], "labels.txt", "head/head.json"}
    report = json.loads((run / "export.json").read_text())
    assert set(report["formats"]) == {"tflite"} and report["formats"]["tflite"]["top1_agreement"] >= 0.99
    code = cli.main(["predict", *[str(exported["images"] / row["path"]) for row in rows], "--model", str(folder), "--json"])
    assert code == 0
    predicted = [item["predictions"][0] for item in json.loads(capsys.readouterr().out)]
    assert [item["class"] for item in predicted] == [row["predicted"] for row in rows]
    np.testing.assert_allclose([item["confidence"] for item in predicted], [float(row["confidence"]) for row in rows], atol=1e-5)


def test_disagreement_with_evaluate_fails_the_stage_and_writes_nothing(exported, tmp_path):
    root, rows = exported["project"].root, read_rows(exported["stack"] / "test_predictions.csv")
    names = ["daisy", "roses", "tulips"]
    for row in rows[:3]:  # three of nine test images now "predicted" otherwise: 67% agreement
        row["predicted"] = names[(names.index(row["predicted"]) + 1) % 3]
    tampered = tmp_path / "test_predictions.csv"
    with tampered.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    command = [sys.executable, "stages/export.py", "--features", "data/features", "--model", "models/head",
               "--test-predictions", str(tampered), "--images", "data/raw/images", "--out", str(tmp_path / "out"),
               "--metrics", str(tmp_path / "export.json")]
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert "does not reproduce evaluate's test predictions" in result.stderr
    assert f"3 of {len(rows)} differ" in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "export.json").exists()
