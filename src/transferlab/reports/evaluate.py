"""evaluate: the trained head on the test split, validation beside it, and what produced them.

Metrics come from scikit-learn. The plots are data for DVC's confusion template (one row per
test image: actual and predicted class name), a per-image predictions file that the export
stage checks its model against, and a PNG gallery of the most confidently wrong test images.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from sklearn import metrics as sklearn_metrics

from transferlab import heads
from transferlab.core import atomic
from transferlab.heads import base

TOP_K = 2
PREDICTION_COLUMNS = ("path", "sha256", "actual", "predicted", "confidence")
GALLERY_COLUMNS = 4
THUMBNAIL_PIXELS = 256
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's default bomb limit, as in params download.max_image_pixels
logger = logging.getLogger(__name__)


def classification_metrics(*, labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, top-2 accuracy, log loss and per-class figures.

    Args:
        labels: true class indices, (N,).
        probabilities: predicted class probabilities, (N, C); the prediction is the argmax.
        class_names: the C class names, in index order.

    Returns:
        A JSON-ready mapping; only ``{"examples": 0}`` when there are no rows.
    """
    labels = np.asarray(labels)
    if len(labels) == 0:
        return {"examples": 0}
    classes = np.arange(len(class_names))
    predictions = probabilities.argmax(axis=1)
    precision, recall, f1, support = sklearn_metrics.precision_recall_fscore_support(
        labels, predictions, labels=classes, zero_division=0
    )
    return {
        "examples": int(len(labels)),
        "accuracy": float(sklearn_metrics.accuracy_score(labels, predictions)),
        "balanced_accuracy": float(sklearn_metrics.balanced_accuracy_score(labels, predictions)),
        "macro_f1": float(sklearn_metrics.f1_score(labels, predictions, labels=classes, average="macro", zero_division=0)),
        f"top{TOP_K}_accuracy": top_k_accuracy(labels, probabilities, k=TOP_K),
        "log_loss": float(sklearn_metrics.log_loss(labels, probabilities, labels=classes)),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
    }


def top_k_accuracy(labels: np.ndarray, probabilities: np.ndarray, *, k: int) -> float:
    """Share of rows whose true class is among the ``k`` most probable (1.0 when k >= classes)."""
    classes = probabilities.shape[1]
    if k >= classes:
        return 1.0
    return float(sklearn_metrics.top_k_accuracy_score(labels, probabilities, k=k, labels=np.arange(classes)))


def provenance(
    *, description: base.HeadDescription, features: base.Features, extract_report: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Which backbones (weights, engine) and which head produced the figures.

    A head trained on pixels (``scratch``) used no backbone: its backbone is ``none``, with no
    blocks, engine ``keras`` and ``random_init`` false (its own weights are trained, not random).

    Args:
        description: the head's description (head.json).
        features: a split's features (their blocks and, when recorded, engines).
        extract_report: metrics/extract_features.json, when available (engine, image size).
    """
    if heads.reads_pixels(description.head):
        return {"head": description.head, "head_settings": description.settings, "backbone": "none", "blocks": {},
                "engine": "keras", "random_init": False}
    reported = {
        entry.get("spec"): entry
        for entry in dict((extract_report or {}).get("backbones") or {}).values()
        if isinstance(entry, Mapping)
    }
    recorded = features.engine if isinstance(features.engine, list) else [features.engine] * len(features.blocks)
    blocks: dict[str, Any] = {}
    for index, block in enumerate(features.blocks):
        entry = block.describe()
        extra = reported.get(block.spec, {})
        entry["engine"] = str(recorded[index] or extra.get("engine") or "unknown")
        entry["random_init"] = bool(entry["random_init"] or extra.get("random_init", False))
        if "image_size" in extra:
            entry["image_size"] = extra["image_size"]
        key = block.name or block.spec
        blocks[key if key not in blocks else f"{index}:{key}"] = entry
    engines = sorted({entry["engine"] for entry in blocks.values()})
    return {
        "head": description.head,
        "head_settings": description.settings,
        "backbone": base.stack_name(features.blocks),
        "blocks": blocks,
        "engine": "+".join(engines),
        "random_init": any(entry["random_init"] for entry in blocks.values()),
    }


@dataclass(frozen=True)
class Mistake:
    """A wrong test prediction, for the gallery."""

    path: str
    actual: str
    predicted: str
    confidence: float
    actual_probability: float


@dataclass(frozen=True)
class Evaluation:
    """Everything the evaluate stage writes, in memory."""

    metrics: dict[str, Any]
    confusion: list[dict[str, str]]
    predictions: list[dict[str, Any]]
    mistakes: list[Mistake]


def evaluate(
    *,
    head: base.TrainedHead,
    val: base.Features,
    test: base.Features,
    gallery_images: int,
    extract_report: Mapping[str, Any] | None = None,
) -> Evaluation:
    """Runs ``head`` on val and test and assembles metrics, confusion rows, predictions, mistakes.

    Raises:
        ValueError: the test split is empty, or the features do not match the head.
    """
    if len(test) == 0:
        raise ValueError(f"{test.source} has no rows; evaluation needs test images (set split.test_fraction > 0)")
    for split in (val, test):
        head.description.check_features(split)
    class_names = head.description.class_names
    test_probabilities = base.predict_split(head, test)
    val_probabilities = base.predict_split(head, val)
    report = {
        "test": classification_metrics(labels=test.labels, probabilities=test_probabilities, class_names=class_names),
        "val": classification_metrics(labels=val.labels, probabilities=val_probabilities, class_names=class_names),
        "provenance": provenance(description=head.description, features=test, extract_report=extract_report),
    }
    predictions = test_probabilities.argmax(axis=1)
    return Evaluation(
        metrics=report,
        confusion=confusion_rows(labels=test.labels, predictions=predictions, class_names=class_names),
        predictions=prediction_rows(features=test, probabilities=test_probabilities),
        mistakes=confident_mistakes(features=test, probabilities=test_probabilities, limit=gallery_images),
    )


def confusion_rows(*, labels: np.ndarray, predictions: np.ndarray, class_names: Sequence[str]) -> list[dict[str, str]]:
    """One ``{"actual", "predicted"}`` row of class names per image (DVC's confusion template)."""
    return [{"actual": class_names[a], "predicted": class_names[p]} for a, p in zip(labels.tolist(), predictions.tolist())]


def prediction_rows(*, features: base.Features, probabilities: np.ndarray) -> list[dict[str, Any]]:
    """One row per image: path, sha256, actual and predicted class names, confidence of the prediction."""
    predictions = probabilities.argmax(axis=1)
    names = features.class_names
    return [
        {
            "path": features.paths[i],
            "sha256": features.sha256[i],
            "actual": names[features.labels[i]],
            "predicted": names[predictions[i]],
            "confidence": float(probabilities[i, predictions[i]]),
        }
        for i in range(len(features))
    ]


def confident_mistakes(*, features: base.Features, probabilities: np.ndarray, limit: int) -> list[Mistake]:
    """The ``limit`` wrong predictions made with the highest confidence, most confident first."""
    predictions = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predictions != features.labels)
    confidence = probabilities[wrong, predictions[wrong]]
    order = wrong[np.argsort(-confidence, kind="stable")][:limit]
    names = features.class_names
    return [
        Mistake(
            path=features.paths[i], actual=names[features.labels[i]], predicted=names[predictions[i]],
            confidence=float(probabilities[i, predictions[i]]), actual_probability=float(probabilities[i, features.labels[i]]),
        )
        for i in order
    ]


def read_extract_report(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """Reads metrics/extract_features.json; ``None`` when no path is given or the file is absent."""
    if path is None or not Path(path).is_file():
        return None
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); re-run extract_features") from None
    return report if isinstance(report, dict) else None


def write_predictions(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Writes prediction rows as CSV (columns :data:`PREDICTION_COLUMNS`), atomically."""
    with atomic.atomic_path(path) as temporary:
        with temporary.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=PREDICTION_COLUMNS, lineterminator="\n")
            writer.writeheader()
            for row in rows:
                writer.writerow({**row, "confidence": f"{row['confidence']:.6f}"})


def render_gallery(
    mistakes: Sequence[Mistake],
    *,
    images_directory: str | os.PathLike,
    path: str | os.PathLike,
    test_images: int,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> None:
    """Draws the mistakes as a grid of labelled thumbnails into a PNG at ``path`` (atomically).

    Each tile shows the image, its true class and the predicted class with its confidence.
    With no mistakes, the PNG says so. An image that cannot be opened gets a tile saying why.
    """
    from matplotlib.figure import Figure

    columns = max(1, min(GALLERY_COLUMNS, len(mistakes)))
    rows = max(1, math.ceil(len(mistakes) / columns))
    figure = Figure(figsize=(3.4 * columns, 3.5 * rows + 0.5), dpi=100, layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).reshape(-1)
    for axis in axes:
        axis.set_axis_off()
    if not mistakes:
        axes[0].text(0.5, 0.5, f"No misclassified images\namong {test_images} test images", ha="center", va="center", fontsize=13)
    for axis, mistake in zip(axes, mistakes):
        _draw_tile(axis, mistake, Path(images_directory), max_image_pixels)
    figure.suptitle(
        f"Most confidently wrong test images: {len(mistakes)} shown, of {test_images}\n"
        "(predicted class and its probability; true class and its probability)", fontsize=12,
    )
    _save_png(figure, path)


def _save_png(figure: Any, path: str | os.PathLike) -> None:
    # Photos make a large truecolour PNG (1.6 MB for 12 tiles); a dithered 256-colour palette keeps
    # this plot, which is committed to git beside the metrics, 3x smaller with no visible banding.
    from PIL import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    buffer.seek(0)
    with Image.open(buffer) as rendered:
        colours = rendered.convert("RGB")
    indexed = colours.quantize(palette=colours.quantize(colors=256), dither=Image.Dither.FLOYDSTEINBERG)
    with atomic.atomic_path(path) as temporary:
        indexed.save(temporary, format="PNG", optimize=True)


def _draw_tile(axis: Any, mistake: Mistake, images_directory: Path, max_image_pixels: int) -> None:
    try:
        thumbnail = _thumbnail(images_directory / mistake.path, max_image_pixels)
        axis.imshow(np.asarray(thumbnail))
    except (OSError, SyntaxError, ValueError) as error:  # PIL raises these for missing or damaged files
        axis.text(0.5, 0.5, f"cannot open image\n({type(error).__name__})", ha="center", va="center", fontsize=10,
                  transform=axis.transAxes)
    axis.set_title(
        f"predicted {mistake.predicted} ({mistake.confidence:.1%})\ntrue {mistake.actual} ({mistake.actual_probability:.1%})",
        fontsize=10, color="#b00020", fontweight="bold",
    )
    axis.text(0.5, -0.02, _shorten(mistake.path, 44), ha="center", va="top", fontsize=7, color="#555555",
              transform=axis.transAxes)


def _thumbnail(path: Path, max_image_pixels: int) -> Any:
    from transferlab.data import images

    image = images.open_rgb(path, max_image_pixels=max_image_pixels)
    image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    return image


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]
