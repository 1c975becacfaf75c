"""evaluate's library: metrics against hand-computed values, provenance, plots data, the mistakes gallery."""

from __future__ import annotations

import csv
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from transferlab.data import tables
from transferlab.features import files
from transferlab.heads import base
from transferlab.reports import evaluate, gallery

CLASSES = ("daisy", "rose", "tulip")
LABELS = np.array([0, 0, 1, 1, 2, 2])
PROBABILITIES = np.array(
    [
        [0.70, 0.20, 0.10],  # daisy -> daisy
        [0.20, 0.50, 0.30],  # daisy -> rose (daisy not in the top 2)
        [0.10, 0.80, 0.10],  # rose -> rose
        [0.30, 0.60, 0.10],  # rose -> rose
        [0.10, 0.30, 0.60],  # tulip -> tulip
        [0.45, 0.20, 0.35],  # tulip -> daisy (tulip second: a top-2 hit)
    ]
)
BLOCKS = (
    files.Block("mobilenet_v2", "mobilenet_v2_weights.h5", 2, 0, "mobilenet_v2"),
    files.Block("tflite:lite0.tflite", "random-init-seed3", 1, 2, "lite0"),
)


def features(labels=LABELS, *, engine=None, blocks=BLOCKS, name="test") -> files.Features:
    rows = len(labels)
    return files.Features(
        features=np.arange(rows * 3, dtype=np.float32).reshape(rows, 3),
        labels=np.asarray(labels),
        class_names=CLASSES,
        blocks=blocks,
        paths=tuple(f"{CLASSES[c]}/{i}.jpg" for i, c in enumerate(labels)),
        sha256=tuple(f"{i:064x}" for i in range(rows)),
        recipes=("",) * rows,
        engine=engine,
        source=f"{name}.npz",
    )


@dataclass(frozen=True)
class FixedHead:
    """A head that answers with fixed probabilities (one row per feature row, in order)."""

    description: base.HeadDescription
    probabilities: np.ndarray

    def predict_proba(self, rows: np.ndarray) -> np.ndarray:
        return self.probabilities[: len(rows)]


def fixed_head(probabilities=PROBABILITIES) -> FixedHead:
    description = base.HeadDescription(head="logistic", class_names=CLASSES, blocks=BLOCKS, settings={"c": 0.1})
    return FixedHead(description=description, probabilities=probabilities)


def test_metrics_equal_hand_computed_values():
    report = evaluate.classification_metrics(labels=LABELS, probabilities=PROBABILITIES, class_names=CLASSES)
    # predictions: daisy, rose, rose, rose, tulip, daisy
    assert report["examples"] == 6
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 2 + 1 / 2) / 3)
    per_class = report["per_class"]
    assert per_class["daisy"] == pytest.approx({"precision": 1 / 2, "recall": 1 / 2, "f1": 1 / 2, "support": 2})
    assert per_class["rose"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert per_class["tulip"] == pytest.approx({"precision": 1.0, "recall": 1 / 2, "f1": 2 / 3, "support": 2})
    assert report["macro_f1"] == pytest.approx((1 / 2 + 0.8 + 2 / 3) / 3)
    assert report["top2_accuracy"] == pytest.approx(5 / 6)
    expected_log_loss = -np.mean(np.log([0.70, 0.20, 0.80, 0.60, 0.60, 0.35]))
    assert report["log_loss"] == pytest.approx(expected_log_loss)


@pytest.mark.parametrize("seed", range(6))
def test_metrics_equal_scikit_learns_with_ties_unpredicted_and_absent_classes(seed):
    # evaluate computes them with NumPy (no scikit-learn import in the head loop): the same figures.
    from sklearn import metrics

    rng = np.random.default_rng(seed)
    classes = ("a", "b", "c", "d", "e")
    labels = rng.choice([0, 1, 2, 4], size=40)  # class d never occurs
    probabilities = rng.dirichlet(np.ones(5), size=40)
    probabilities[:8] = np.round(probabilities[:8], 1)  # ties for the top-2 ranking
    probabilities[:, 3 if seed % 2 else 1] *= 0.01  # a class (almost) never predicted
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    report = evaluate.classification_metrics(labels=labels, probabilities=probabilities, class_names=classes)
    predictions, every = probabilities.argmax(axis=1), np.arange(5)
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        labels, predictions, labels=every, zero_division=0
    )
    assert report["accuracy"] == pytest.approx(metrics.accuracy_score(labels, predictions))
    assert report["balanced_accuracy"] == pytest.approx(metrics.balanced_accuracy_score(labels, predictions))
    assert report["macro_f1"] == pytest.approx(
        metrics.f1_score(labels, predictions, labels=every, average="macro", zero_division=0)
    )
    assert report["log_loss"] == pytest.approx(metrics.log_loss(labels, probabilities, labels=every))
    assert report["top2_accuracy"] == pytest.approx(
        metrics.top_k_accuracy_score(labels, probabilities, k=2, labels=every)
    )
    for index, name in enumerate(classes):
        assert report["per_class"][name] == pytest.approx(
            {"precision": precision[index], "recall": recall[index], "f1": f1[index], "support": support[index]}
        )


def test_top2_is_perfect_with_two_classes_and_metrics_of_an_empty_split_are_just_a_count():
    assert evaluate.top_k_accuracy(np.array([0, 1]), np.array([[0.9, 0.1], [0.8, 0.2]]), k=2) == 1.0
    empty = evaluate.classification_metrics(
        labels=np.array([], dtype=int), probabilities=np.zeros((0, 3)), class_names=CLASSES
    )
    assert empty == {"examples": 0}


def test_evaluate_report_schema_and_plot_data():
    result = evaluate.evaluate(head=fixed_head(), val=features(name="val"), test=features(), gallery_images=10)
    report = result.metrics
    assert set(report) == {"test", "val", "provenance"}
    metric_keys = {"examples", "accuracy", "balanced_accuracy", "macro_f1", "top2_accuracy", "log_loss", "per_class"}
    assert set(report["test"]) == metric_keys and set(report["val"]) == metric_keys
    assert set(report["test"]["per_class"]) == set(CLASSES)
    assert all(set(item) == {"precision", "recall", "f1", "support"} for item in report["test"]["per_class"].values())
    assert result.confusion == [
        {"actual": a, "predicted": p}
        for a, p in [
            ("daisy", "daisy"),
            ("daisy", "rose"),
            ("rose", "rose"),
            ("rose", "rose"),
            ("tulip", "tulip"),
            ("tulip", "daisy"),
        ]
    ]
    assert [row["predicted"] for row in result.predictions] == ["daisy", "rose", "rose", "rose", "tulip", "daisy"]
    assert result.predictions[1] == {
        "path": "daisy/1.jpg",
        "sha256": f"{1:064x}",
        "actual": "daisy",
        "predicted": "rose",
        "confidence": 0.5,
    }
    # The two mistakes, most confident first.
    assert [(m.path, m.predicted, m.confidence, m.actual_probability) for m in result.mistakes] == [
        ("daisy/1.jpg", "rose", 0.5, 0.2),
        ("tulip/5.jpg", "daisy", 0.45, 0.35),
    ]
    assert len(evaluate.evaluate(head=fixed_head(), val=features(), test=features(), gallery_images=1).mistakes) == 1
    assert evaluate.describe(report) == (
        "mobilenet_v2+lite0 + logistic head on 6 test images: accuracy 0.6667, balanced accuracy 0.6667, "
        "macro-F1 0.6556, top-2 0.8333"
    )


def test_provenance_names_backbones_weights_engine_and_flags_random_init():
    origin = evaluate.provenance(description=fixed_head().description, features=features(engine=["keras", "tflite"]))
    assert origin["head"] == "logistic" and origin["head_settings"] == {"c": 0.1}
    assert origin["backbone"] == "mobilenet_v2+lite0"
    assert origin["engine"] == "keras+tflite"
    assert origin["random_init"] is True
    assert origin["blocks"]["mobilenet_v2"]["random_init"] is False
    assert origin["blocks"]["lite0"]["random_init"] is True
    assert origin["blocks"]["mobilenet_v2"]["weights"] == "mobilenet_v2_weights.h5"


def test_provenance_falls_back_on_the_extract_report():
    report = {
        "backbones": {
            "mobilenet_v2": {"spec": "mobilenet_v2", "engine": "tflite", "image_size": 224, "random_init": False}
        }
    }
    only_real = (BLOCKS[0],)
    description = base.HeadDescription(head="dense", class_names=CLASSES, blocks=only_real)
    origin = evaluate.provenance(description=description, features=features(blocks=only_real), extract_report=report)
    assert origin["engine"] == "tflite" and origin["random_init"] is False
    assert origin["blocks"]["mobilenet_v2"]["image_size"] == 224
    unknown = evaluate.provenance(description=description, features=features(blocks=only_real))
    assert unknown["engine"] == "unknown"


def test_evaluate_refuses_an_empty_test_split_and_foreign_features():
    empty = features(labels=np.array([], dtype=int))
    with pytest.raises(ValueError, match="split.test_fraction"):
        evaluate.evaluate(head=fixed_head(), val=features(), test=empty, gallery_images=4)
    foreign = features(blocks=(BLOCKS[0], files.Block("resnet50", "imagenet", 1, 2)))
    with pytest.raises(ValueError, match="re-run train_head"):
        evaluate.evaluate(head=fixed_head(), val=features(), test=foreign, gallery_images=4)


def test_predictions_csv(tmp_path):
    result = evaluate.evaluate(head=fixed_head(), val=features(), test=features(), gallery_images=4)
    tables.write_predictions(result.predictions, tmp_path / "predictions.csv")
    with (tmp_path / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(tables.PREDICTION_COLUMNS)
    assert rows[5] == {
        "path": "tulip/5.jpg",
        "sha256": f"{5:064x}",
        "actual": "tulip",
        "predicted": "daisy",
        "confidence": "0.450000",
    }


def test_gallery_png_with_images_a_missing_file_and_no_mistakes(tmp_path):
    images = tmp_path / "images"
    (images / "daisy").mkdir(parents=True)
    Image.new("RGB", (120, 80), (200, 30, 30)).save(images / "daisy" / "1.jpg")
    result = evaluate.evaluate(head=fixed_head(), val=features(), test=features(), gallery_images=4)
    # daisy/1.jpg exists; tulip/5.jpg does not and gets a tile saying so.
    gallery.render_gallery(
        result.mistakes, images_directory=images, path=tmp_path / "gallery.png", test_images=6, max_image_pixels=10**6
    )
    with Image.open(tmp_path / "gallery.png") as png:
        assert png.format == "PNG" and png.width >= 400 and png.height >= 300
        pixels = np.asarray(png.convert("RGB"))
    assert np.any(np.all(np.abs(pixels.astype(int) - [200, 30, 30]) < 12, axis=-1)), "the thumbnail is not drawn"
    gallery.render_gallery(
        [], images_directory=images, path=tmp_path / "none.png", test_images=6, max_image_pixels=10**6
    )
    with Image.open(tmp_path / "none.png") as png:
        assert png.format == "PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gallery.png",
        "images",
        "none.png",
    ]  # no temporary files left


def test_gallery_opens_images_with_the_given_limit(tmp_path):
    images = tmp_path / "images"
    (images / "daisy").mkdir(parents=True)
    Image.new("RGB", (120, 80), (200, 30, 30)).save(images / "daisy" / "1.jpg")
    result = evaluate.evaluate(head=fixed_head(), val=features(), test=features(), gallery_images=4)
    # 120x80 pixels exceed a limit of 9600 - 1: the tile says the image cannot be opened instead of failing.
    gallery.render_gallery(
        result.mistakes,
        images_directory=images,
        path=tmp_path / "gallery.png",
        test_images=6,
        max_image_pixels=120 * 80 - 1,
    )
    with Image.open(tmp_path / "gallery.png") as png:
        pixels = np.asarray(png.convert("RGB"))
    assert not np.any(np.all(np.abs(pixels.astype(int) - [200, 30, 30]) < 12, axis=-1)), "a too-large image was drawn"


def test_read_extract_report(tmp_path):
    assert evaluate.read_extract_report(None) is None
    assert evaluate.read_extract_report(tmp_path / "absent.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        evaluate.read_extract_report(tmp_path / "bad.json")
