"""The export stage's check: the exported files must reproduce evaluate's test predictions.

Every format written is loaded back from the folder through :func:`transferlab.export.predict.load`
(what ``transferlab predict`` runs) and run on the raw test images (decoded from the files, not
from features); its top-1 class must equal evaluate's prediction (metrics/evaluate/test_predictions.csv)
on at least :data:`MINIMUM_AGREEMENT` of them, else the stage fails and writes nothing. Measured
on all 3670 flower_photos (MobileNetV2 with the shared weights, logistic head, 735 test images):
model.tflite 735/735 with confidences within 2e-6 (it is fed the pipeline's own resize),
model.keras 734/735 (the one that flipped had confidence 0.49; the in-graph resize moves
confidences by up to 0.12).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from transferlab.data import images
from transferlab.export import predict

MINIMUM_AGREEMENT = 0.99
LATENCY_RUNS = 20
CHECK_BATCH = 32


def select_rows(rows: Sequence[dict[str, str]], *, count: int, seed: int) -> list[dict[str, str]]:
    """``count`` rows drawn without replacement (seeded), in file order; 0 or more than there are = all."""
    if count <= 0 or count >= len(rows):
        return list(rows)
    chosen = np.random.default_rng(seed).choice(len(rows), size=count, replace=False)
    return [rows[index] for index in sorted(chosen.tolist())]


def check_against_evaluate(
    folder: Path,
    *,
    rows: Sequence[dict[str, str]],
    images_directory: Path,
    max_image_pixels: int,
    minimum_agreement: float = MINIMUM_AGREEMENT,
) -> dict[str, Any]:
    """Runs every format in ``folder`` on the rows' raw images; compares with evaluate's predictions.

    Args:
        folder: a written export.
        rows: test_predictions.csv rows to check (:func:`select_rows`).
        images_directory: data/raw/images (the rows' paths are relative to it).
        max_image_pixels: decompression-bomb limit (params ``download.max_image_pixels``).
        minimum_agreement: the share of top-1 predictions that must agree.

    Returns:
        Per format: agreement, disagreements, largest difference in the confidence of
        evaluate's predicted class, single-image latency; and, for model.keras, how far its
        in-graph resize is from Pillow's on these images.

    Raises:
        ValueError: an image differs from the one evaluate saw, or agreement is below the minimum.
    """
    manifest = predict.read_manifest(folder)
    models = {name: predict.load(folder, format=name) for name in predict.available_formats(manifest)}
    tallies = {name: _Tally() for name in models}
    resize = _ResizeTally(models.get("keras"))
    first = None
    for start in range(0, len(rows), CHECK_BATCH):
        chunk = rows[start : start + CHECK_BATCH]
        pictures = [_open_checked(images_directory, row, max_image_pixels) for row in chunk]
        first = pictures[0] if first is None else first
        for name, model in models.items():
            tallies[name].add(chunk, model.predict(pictures), model.class_names)
        resize.add(pictures)
    report = {
        name: {**tally.summary(), "latency_ms": predict.median_latency_ms(models[name], first, runs=LATENCY_RUNS)}
        for name, tally in tallies.items()
    }
    _require_agreement(report, tallies, minimum_agreement)
    resize_report = {"rule": manifest["resize"]["rule"], **resize.summary()}
    return {"formats": report, "checked_images": len(rows), "resize": resize_report}


def _open_checked(images_directory: Path, row: dict[str, str], max_image_pixels: int) -> Any:
    path = images_directory / row["path"]
    if not path.is_file() or images.sha256_file(path) != row["sha256"]:
        raise ValueError(f"{path} is missing or is not the image evaluate saw (sha256 differs); run `dvc repro`")
    try:
        return images.open_rgb(path, max_image_pixels=max_image_pixels)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(f"{path} is too large ({error}); raise download.max_image_pixels or re-run download") from None


class _Tally:
    """Agreement of one format with evaluate's predictions, accumulated batch by batch."""

    def __init__(self) -> None:
        self.agreeing = 0
        self.total = 0
        self.largest_difference = 0.0
        self.disagreements: list[dict[str, Any]] = []

    def add(self, rows: Sequence[dict[str, str]], probabilities: np.ndarray, class_names: Sequence[str]) -> None:
        index = {name: i for i, name in enumerate(class_names)}
        for row, row_probabilities in zip(rows, probabilities):
            predicted = class_names[int(np.argmax(row_probabilities))]
            difference = abs(float(row_probabilities[index[row["predicted"]]]) - float(row["confidence"]))
            self.largest_difference = max(self.largest_difference, difference)
            self.total += 1
            if predicted == row["predicted"]:
                self.agreeing += 1
            else:
                self.disagreements.append(
                    {
                        "path": row["path"],
                        "evaluate": row["predicted"],
                        "export": predicted,
                        "evaluate_confidence": float(row["confidence"]),
                    }
                )

    def summary(self) -> dict[str, Any]:
        return {
            "top1_agreement": round(self.agreeing / self.total, 6),
            "disagreements": len(self.disagreements),
            "disagreeing_images": self.disagreements[:10],
            "max_confidence_difference": round(self.largest_difference, 6),
        }


class _ResizeTally:
    """How far model.keras's in-graph resize is from the pipeline's Pillow resize (grey levels)."""

    def __init__(self, exported: predict.ExportedModel | None):
        self.resizers = _resize_models(exported) if exported is not None else {}
        self.largest = 0.0
        self.exact = 0
        self.values = 0

    def add(self, pictures: Sequence[Any]) -> None:
        for size, resizer in self.resizers.items():
            for picture in pictures:
                ours = np.clip(np.round(resizer(np.asarray(picture)[None])), 0, 255)[0]
                theirs = predict.resize_all([picture], [size])[size][0].astype(np.float64)
                difference = np.abs(ours - theirs)
                self.largest = max(self.largest, float(difference.max()))
                self.exact += int(np.count_nonzero(difference == 0))
                self.values += difference.size

    def summary(self) -> dict[str, Any]:
        if not self.values:
            return {}
        return {"keras_max_abs_difference": self.largest, "keras_exact_share": round(self.exact / self.values, 6)}


def _resize_models(exported: predict.ExportedModel) -> dict[int, Any]:
    import keras
    import tensorflow as tf

    model = exported.runner.model
    resizers = {}
    for item in exported.manifest["inputs"]:
        size = int(item["image_size"])
        cut = keras.Model(model.inputs, model.get_layer(f"resize_{size}").output)
        call = tf.function(
            lambda pixels, cut=cut: cut(pixels), input_signature=[tf.TensorSpec((None, None, None, 3), tf.uint8)]
        )
        resizers[size] = lambda pixels, call=call: call(pixels).numpy().astype(np.float64)
    return resizers


def _require_agreement(report: dict[str, Any], tallies: dict[str, _Tally], minimum: float) -> None:
    failing = {name: figures for name, figures in report.items() if figures["top1_agreement"] < minimum}
    if not failing:
        return
    lines = []
    for name, figures in failing.items():
        examples = ", ".join(
            f"{item['path']} ({item['evaluate']} -> {item['export']})" for item in figures["disagreeing_images"][:5]
        )
        lines.append(
            f"{name}: top-1 agreement {figures['top1_agreement']:.2%} ({figures['disagreements']} of "
            f"{tallies[name].total} differ, e.g. {examples})"
        )
    raise ValueError(
        f"the exported model does not reproduce evaluate's test predictions (needs >= {minimum:.0%}):\n  "
        + "\n  ".join(lines)
        + "\nThe export is not written. Check that data/raw/images, models/head and the extract_features params are "
        "those evaluate used (`dvc repro` brings them in line)"
    )


def describe(report: dict[str, Any]) -> str:
    """One line for the log: each format's agreement with evaluate and single-image latency."""
    formats = ", ".join(
        f"{name} {100 * figures['top1_agreement']:.2f}% ({figures['latency_ms']:.1f} ms per image)"
        for name, figures in report["formats"].items()
    )
    return f"top-1 agreement with evaluate on {report['checked_images']} test images: {formats}"
