"""train_head and evaluate as stage scripts, run as DVC runs them, on features files made here."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPOSITORY = Path(__file__).resolve().parents[2]
CLASSES = ("daisy", "roses", "tulips")
WIDTHS = (6, 10)
COLOURS = {"daisy": (240, 240, 200), "roses": (200, 30, 60), "tulips": (250, 150, 20)}
CURVES = ("train/loss.tsv", "train/accuracy.tsv", "val/loss.tsv", "val/accuracy.tsv")


@pytest.fixture()
def workspace(tmp_path: Path) -> Path:
    """Features files of a two-block stack (one block 1000x louder), test images, params.yaml."""
    rng = np.random.default_rng(0)
    centers = 0.9 * rng.normal(size=(len(CLASSES), sum(WIDTHS)))
    for split, per_class in (("train", 30), ("val", 12), ("test", 12)):
        labels = np.repeat(np.arange(len(CLASSES)), per_class)
        features = (centers[labels] + rng.normal(size=(len(labels), sum(WIDTHS)))) * np.repeat([1.0, 1000.0], WIDTHS)
        paths = [f"{CLASSES[label]}/{split}_{index:03d}.jpg" for index, label in enumerate(labels)]
        if split == "test":
            for path, label in zip(paths, labels):
                target = tmp_path / "data" / "raw" / "images" / path
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (160 + 8 * label, 120), COLOURS[CLASSES[label]]).save(target)
        folder = tmp_path / "data" / "features"
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(
            folder / f"{split}.npz",
            features=features.astype(np.float32),
            labels=labels.astype(np.int32),
            class_names=np.array(CLASSES),
            paths=np.array(paths),
            sha256=np.array([f"{i:064x}" for i in range(len(labels))]),
            recipes=np.array([""] * len(labels)),
            block_specs=np.array(["mobilenet_v2", "tflite:lite0.tflite"]),
            block_names=np.array(["mobilenet_v2", "lite0"]),
            block_weights=np.array(["weights.h5", "random-init-seed0"]),
            block_engines=np.array(["keras", "tflite"]),
            block_widths=np.array(WIDTHS, dtype=np.int64),
            block_offsets=np.array([0, WIDTHS[0]], dtype=np.int64),
        )
    write_params(tmp_path, {"head": "logistic", "logistic": {"c_grid": [0.01, 0.1, 1.0]}})
    return tmp_path


def write_params(root: Path, train_head: dict, evaluate: dict | None = None, download: dict | None = None) -> None:
    content = {"base": {"seed": 7}, "train_head": train_head, "evaluate": evaluate or {"gallery_images": 8}}
    if download is not None:
        content["download"] = download
    (root / "params.yaml").write_text(yaml.safe_dump(content), encoding="utf-8")


def run_stage(root: Path, stage: str, *arguments: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, str(REPOSITORY / "stages" / f"{stage}.py"), *arguments],
        cwd=root,
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
    )


def train_head(root: Path) -> subprocess.CompletedProcess:
    return run_stage(
        root,
        "train_head",
        "--features",
        "data/features",
        "--model",
        "models/head",
        "--metrics",
        "metrics/train_head.json",
        "--live",
        "metrics/train_head",
    )


def evaluate(root: Path) -> subprocess.CompletedProcess:
    return run_stage(
        root,
        "evaluate",
        "--features",
        "data/features",
        "--model",
        "models/head",
        "--images",
        "data/raw/images",
        "--metrics",
        "metrics/evaluate.json",
        "--plots",
        "metrics/evaluate",
        "--extract-metrics",
        "metrics/extract_features.json",
    )


def read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def test_logistic_train_head_then_evaluate_write_every_output(workspace):
    (workspace / "metrics").mkdir()
    (workspace / "metrics" / "extract_features.json").write_text(
        json.dumps({"backbones": {"mobilenet_v2": {"spec": "mobilenet_v2", "engine": "keras", "image_size": 224}}})
    )
    trained = train_head(workspace)
    assert trained.returncode == 0, trained.stderr
    assert "C=0.01" in trained.stderr and "chose C=" in trained.stderr  # progress lines
    assert sorted(p.name for p in (workspace / "models" / "head").iterdir()) == [
        "head.json",
        "logistic.npz",
        "standardizer.npz",
    ]
    report = json.loads((workspace / "metrics" / "train_head.json").read_text())
    assert report["head"] == "logistic" and report["c"] in (0.01, 0.1, 1.0)
    assert report["train"]["examples"] == 90 and report["val"]["examples"] == 36 and report["val"]["accuracy"] > 0.6
    live = workspace / "metrics" / "train_head"
    assert sorted(str(p.relative_to(live)) for p in live.rglob("*") if p.is_file()) == sorted(CURVES)
    assert [row["step"] for row in read_tsv(live / "val" / "accuracy.tsv")] == ["0", "1", "2"]  # one step per C

    evaluated = evaluate(workspace)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "random-init" in evaluated.stderr
    metrics = json.loads((workspace / "metrics" / "evaluate.json").read_text())
    test = metrics["test"]
    assert test["examples"] == 36 and test["accuracy"] > 0.6  # chance is 1/3
    assert set(test["per_class"]) == set(CLASSES) and metrics["val"]["accuracy"] == pytest.approx(
        report["val"]["accuracy"]
    )
    origin = metrics["provenance"]
    assert origin["backbone"] == "mobilenet_v2+lite0" and origin["head"] == "logistic" and origin["random_init"] is True
    assert origin["engine"] == "keras+tflite" and origin["blocks"]["mobilenet_v2"]["image_size"] == 224

    plots = workspace / "metrics" / "evaluate"
    assert sorted(p.name for p in plots.iterdir()) == ["confusion.json", "gallery.png", "test_predictions.csv"]
    confusion = json.loads((plots / "confusion.json").read_text())
    with (plots / "test_predictions.csv").open(newline="") as handle:
        predictions = list(csv.DictReader(handle))
    assert len(confusion) == len(predictions) == 36
    assert [row["actual"] for row in confusion] == [row["actual"] for row in predictions]
    assert [row["predicted"] for row in confusion] == [row["predicted"] for row in predictions]
    correct = sum(row["actual"] == row["predicted"] for row in predictions)
    assert correct / 36 == pytest.approx(test["accuracy"])
    with Image.open(plots / "gallery.png") as png:
        assert png.format == "PNG"


def test_changing_a_head_param_changes_the_result_and_rerunning_is_stable(workspace):
    assert train_head(workspace).returncode == 0
    first = json.loads((workspace / "metrics" / "train_head.json").read_text())
    first_weights = (workspace / "models" / "head" / "logistic.npz").read_bytes()
    assert train_head(workspace).returncode == 0
    again = json.loads((workspace / "metrics" / "train_head.json").read_text())
    assert {k: v for k, v in first.items() if k != "seconds"} == {k: v for k, v in again.items() if k != "seconds"}
    assert (workspace / "models" / "head" / "logistic.npz").read_bytes() == first_weights
    write_params(workspace, {"head": "logistic", "logistic": {"c_grid": [0.0001]}})
    assert train_head(workspace).returncode == 0
    changed = json.loads((workspace / "metrics" / "train_head.json").read_text())
    assert changed["c"] == 0.0001 and changed["val"]["loss"] != first["val"]["loss"]


@pytest.mark.parametrize(
    ("train_head_params", "message"),
    [
        ({"dense": {"units": 0}}, "train_head.dense.units"),
        (
            {"head": "svm"},
            "train_head.head: unknown head 'svm'; choose one of: dense, finetune, fusion, logistic, scratch",
        ),
        ({"class_weight": "auto"}, "train_head.class_weight"),
        ({"logistic": {"c_grid": []}}, "train_head.logistic.c_grid"),
    ],
)
def test_bad_params_stop_the_stage_naming_the_key(workspace, train_head_params, message):
    write_params(workspace, train_head_params)
    completed = train_head(workspace)
    assert completed.returncode == 1
    assert message in completed.stderr and "Traceback" not in completed.stderr
    assert not (workspace / "models").exists() and not (workspace / "metrics").exists()


def test_both_stages_read_the_image_size_limit_from_params(workspace):
    write_params(workspace, {"head": "logistic"}, download={"max_image_pixels": 0})
    for completed in (train_head(workspace), evaluate(workspace)):
        assert completed.returncode == 1
        assert "download.max_image_pixels" in completed.stderr and "Traceback" not in completed.stderr


def test_evaluate_without_a_head_says_to_run_train_head(workspace):
    completed = evaluate(workspace)
    assert completed.returncode == 1 and "run the train_head stage first" in completed.stderr
    write_params(workspace, {}, {"gallery_images": 100})
    completed = evaluate(workspace)
    assert completed.returncode == 1 and "evaluate.gallery_images" in completed.stderr


@pytest.mark.slow
def test_dense_stage_is_reproducible_and_logs_every_epoch(workspace):
    dense = {"units": 16, "dropout": 0.2, "learning_rate": 0.01, "epochs": 6, "batch_size": 16, "patience": 2}
    write_params(workspace, {"head": "dense", "dense": dense, "class_weight": "balanced"})
    first = train_head(workspace)
    assert first.returncode == 0, first.stderr
    assert "epoch 1/6" in first.stderr
    report = json.loads((workspace / "metrics" / "train_head.json").read_text())
    assert report["head"] == "dense" and 1 <= report["best_epoch"] <= report["epochs_run"] <= 6
    assert len(read_tsv(workspace / "metrics" / "train_head" / "val" / "loss.tsv")) == report["epochs_run"]
    assert evaluate(workspace).returncode == 0
    first_predictions = (workspace / "metrics" / "evaluate" / "test_predictions.csv").read_text()
    assert train_head(workspace).returncode == 0 and evaluate(workspace).returncode == 0
    again = json.loads((workspace / "metrics" / "train_head.json").read_text())
    assert {k: v for k, v in report.items() if k != "seconds"} == {k: v for k, v in again.items() if k != "seconds"}
    assert (workspace / "metrics" / "evaluate" / "test_predictions.csv").read_text() == first_predictions
    assert json.loads((workspace / "metrics" / "evaluate.json").read_text())["provenance"]["head"] == "dense"


DVC_YAML = """
stages:
  train_head:
    cmd: {python} {stages}/train_head.py --features data/features --model models/head --metrics metrics/train_head.json --live metrics/train_head
    deps:
      - data/features
    params:
      - base
      - train_head
    outs:
      - models/head
      - metrics/train_head:
          cache: false
    metrics:
      - metrics/train_head.json:
          cache: false
  evaluate:
    cmd: {python} {stages}/evaluate.py --features data/features --model models/head --images data/raw/images --metrics metrics/evaluate.json --plots metrics/evaluate
    deps:
      - data/features
      - data/raw/images
      - models/head
    params:
      - base
      - evaluate
    outs:
      - metrics/evaluate/test_predictions.csv:
          cache: false
    metrics:
      - metrics/evaluate.json:
          cache: false
    plots:
      - metrics/evaluate/confusion.json:
          cache: false
          template: confusion
          x: actual
          y: predicted
      - metrics/evaluate/gallery.png:
          cache: false
plots:
  - loss:
      x: step
      y:
        metrics/train_head/train/loss.tsv: loss
        metrics/train_head/val/loss.tsv: loss
  - accuracy:
      x: step
      y:
        metrics/train_head/train/accuracy.tsv: accuracy
        metrics/train_head/val/accuracy.tsv: accuracy
"""  # noqa: E501 (the stages' cmd lines as dvc.yaml writes them)


@pytest.mark.slow
def test_under_dvc_plots_parse_and_an_unrelated_head_param_skips_evaluate(workspace):
    dvc = [sys.executable, "-m", "dvc"]

    def run(*command):
        completed = subprocess.run(
            command,
            cwd=workspace,
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "TRANSFERLAB_ROOT": str(workspace)},
        )
        assert completed.returncode == 0, completed.stdout + completed.stderr
        return completed.stdout

    (workspace / "dvc.yaml").write_text(DVC_YAML.format(python=sys.executable, stages=REPOSITORY / "stages"))
    run("git", "init", "-q")
    run(*dvc, "init", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "workspace")
    run(*dvc, "repro")
    plots = json.loads(run(*dvc, "plots", "show", "--json"))
    assert not plots.get("errors"), plots["errors"]
    assert {"loss", "accuracy", "metrics/evaluate/confusion.json", "metrics/evaluate/gallery.png"} <= set(plots["data"])

    write_params(workspace, {"head": "logistic", "logistic": {"c_grid": [0.01, 0.1, 1.0]}, "dense": {"units": 64}})
    output = run(*dvc, "repro")
    assert "Running stage 'train_head'" in output and "Running stage 'evaluate'" not in output  # same head bytes
    write_params(workspace, {"head": "logistic", "logistic": {"c_grid": [0.001]}})
    output = run(*dvc, "repro")
    assert "Running stage 'train_head'" in output and "Running stage 'evaluate'" in output
