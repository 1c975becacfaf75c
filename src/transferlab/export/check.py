"""The export stage's check: each exported format must reproduce evaluate's test predictions.

Every format written is loaded back from the folder through :func:`transferlab.export.predict.load`
(what ``transferlab predict`` runs) and run on the raw test images (decoded from the files, not
from features), then compared with evaluate's predictions (metrics/evaluate/test_predictions.csv:
the predicted class and its probability, the *confidence*).

Probabilities are compared with a tolerance, because two engines (evaluate's extraction engine and
Keras or LiteRT here) never give bit-identical floats:

- The *engine difference* of a format is measured: the largest difference between its probability
  for evaluate's class and evaluate's confidence, over the images whose top-1 class agrees (at
  least :data:`ENGINE_DIFFERENCE_FLOOR`, the CSV's 6 decimals plus float32 noise).
- An image whose top-1 class differs is a *near tie*, and counts as agreeing, when the format's
  top-2 margin (its top probability minus its probability for evaluate's class) is at most twice
  that difference: if each probability moved by at most d, a class ahead of evaluate's by more
  than 2d was ahead for evaluate too. The margin forgiven is capped at :data:`MAXIMUM_TIE_MARGIN`,
  so a clear disagreement is never forgiven, however noisy the format.
- A format is kept when at least :data:`MINIMUM_AGREEMENT` of the images agree, near ties counted.

A format that fails is dropped (:func:`transferlab.export.build.drop_formats`) and named in
metrics/export.json; the stage fails only when no format agrees. Measured on all 3670
flower_photos (MobileNetV2 with the shared weights, logistic head, 735 test images), with the
Keras export's old in-graph resize: model.tflite 735/735 with confidences within 2e-6, model.keras
734/735. Since both formats take the pipeline's own resize they differ by float noise only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from transferlab.data import images
from transferlab.export import predict

MINIMUM_AGREEMENT = 0.99
ENGINE_DIFFERENCE_FLOOR = 1e-5  # test_predictions.csv rounds to 1e-6; float32 softmax adds about as much
MAXIMUM_TIE_MARGIN = 0.05  # engines that differ by more than this are broken, not noisy
LATENCY_RUNS = 20
CHECK_BATCH = 32
LISTED_IMAGES = 10  # disagreeing and near-tie images listed per format in the report
SAMPLE_IMAGES = 32  # run end to end when only the head changed (sample_first); 0.7 s of LiteRT instead of 4


def sample_first(
    rows: Sequence[dict[str, str]], *, seed: int, backbones_as_embedded: bool
) -> tuple[list[dict[str, str]], str]:
    """The rows to run end to end: a seeded sample of :data:`SAMPLE_IMAGES` when that is enough, else all.

    It is enough when every backbone file of the export is the very bytes the test features came
    from (:func:`transferlab.export.build.backbones_as_embedded`): the only model that changed is
    the head, which is evaluate's own, so the sample checks what can still differ (decoding,
    resizing, the files' integrity, the head's copy), and at >= 99% it must agree on every image
    but a near tie. Otherwise (a converted or a new backbone file) every row runs.

    Returns:
        The rows, and why (for metrics/export.json).
    """
    if not backbones_as_embedded:
        return list(rows), "every selected image: the backbone files are new or converted here"
    if len(rows) <= SAMPLE_IMAGES:
        return list(rows), "every selected image: no more than the sample"
    why = (
        f"a seeded sample of {SAMPLE_IMAGES} of the {len(rows)} selected: the backbone files are the bytes the "
        "test features came from, only the head changed"
    )
    return select_rows(rows, count=SAMPLE_IMAGES, seed=seed), why


def select_rows(rows: Sequence[dict[str, str]], *, count: int, seed: int) -> list[dict[str, str]]:
    """``count`` rows drawn without replacement (seeded), in file order; 0 or more than there are = all."""
    if count <= 0 or count >= len(rows):
        return list(rows)
    chosen = np.random.default_rng(seed).choice(len(rows), size=count, replace=False)
    return [rows[index] for index in sorted(chosen.tolist())]


def photo_sample(
    rows: Sequence[dict[str, str]], *, images_directory: Path, max_image_pixels: int, count: int = 16
) -> Callable[[int], np.ndarray]:
    """size -> the first ``count`` rows' photos resized the pipeline's way, uint8 (N, size, size, 3).

    Nothing is opened until it is called (a warm conversion folder never asks for photos); the
    images are checked to be those evaluate saw, as in :func:`check_against_evaluate`.
    """

    def pixels(size: int) -> np.ndarray:
        pictures = [_open_checked(images_directory, row, max_image_pixels) for row in rows[:count]]
        return predict.resize_all(pictures, [size])[size]

    return pixels


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
        minimum_agreement: the share of images that must agree (near ties counted) to keep a format.

    Returns:
        ``formats``: per format, its agreement (near ties counted) and top-1 agreement, near ties,
        disagreements, the measured engine difference and the tie margin it allows, the largest
        confidence difference, single-image latency, and ``kept``; ``dropped``: the formats that
        failed, comma-separated ("" when none); ``checked_images``; ``resize``: the rule.

    Raises:
        ValueError: an image differs from the one evaluate saw, evaluate names a class the export
            does not know, or no format agrees.
    """
    manifest = predict.read_manifest(folder)
    models = {name: predict.load(folder, format=name) for name in predict.available_formats(manifest)}
    tallies = {name: _Tally() for name in models}
    first = None
    for start in range(0, len(rows), CHECK_BATCH):
        chunk = rows[start : start + CHECK_BATCH]
        pictures = [_open_checked(images_directory, row, max_image_pixels) for row in chunk]
        first = pictures[0] if first is None else first
        for name, model in models.items():
            tallies[name].add(chunk, model.predict(pictures), model.class_names)
    report = {
        name: {
            **tally.summary(minimum_agreement),
            "latency_ms": predict.median_latency_ms(models[name], first, runs=LATENCY_RUNS),
        }
        for name, tally in tallies.items()
    }
    _require_some_agreement(report, minimum_agreement)
    return {
        "formats": report,
        "dropped": ",".join(name for name, figures in report.items() if not figures["kept"]),
        "checked_images": len(rows),
        "resize": {"rule": manifest.get("resize", {}).get("rule", "")},
    }


def dropped_reasons(report: dict[str, Any]) -> dict[str, str]:
    """Format -> one line on why it is dropped, for each format the check did not keep."""
    return {name: _failure_line(figures) for name, figures in report["formats"].items() if not figures["kept"]}


def _open_checked(images_directory: Path, row: dict[str, str], max_image_pixels: int) -> Any:
    path = images_directory / row["path"]
    if not path.is_file() or images.sha256_file(path) != row["sha256"]:
        raise ValueError(f"{path} is missing or is not the image evaluate saw (sha256 differs); run `dvc repro`")
    try:
        return images.open_rgb(path, max_image_pixels=max_image_pixels)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(f"{path} is too large ({error}); raise download.max_image_pixels or re-run download") from None


class _Tally:
    """One format's probabilities next to evaluate's predictions, accumulated batch by batch."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.evaluate_class: list[str] = []
        self.export_class: list[str] = []
        self.confidence: list[float] = []  # evaluate's probability of its class
        self.ours: list[float] = []  # this format's probability of evaluate's class
        self.top: list[float] = []  # this format's top probability

    def add(self, rows: Sequence[dict[str, str]], probabilities: np.ndarray, class_names: Sequence[str]) -> None:
        index = {name: i for i, name in enumerate(class_names)}
        for row, row_probabilities in zip(rows, probabilities):
            if row["predicted"] not in index:
                raise ValueError(
                    f"evaluate predicted class {row['predicted']!r} for {row['path']}, which the export does not know "
                    f"({', '.join(class_names)}); run `dvc repro` so that evaluate and export follow the same head"
                )
            self.paths.append(row["path"])
            self.evaluate_class.append(row["predicted"])
            self.export_class.append(class_names[int(np.argmax(row_probabilities))])
            self.confidence.append(float(row["confidence"]))
            self.ours.append(float(row_probabilities[index[row["predicted"]]]))
            self.top.append(float(np.max(row_probabilities)))

    def summary(self, minimum_agreement: float) -> dict[str, Any]:
        """The figures of the module docstring; ``kept`` when agreement (near ties counted) >= the minimum."""
        same = np.array(self.evaluate_class) == np.array(self.export_class)
        differences = np.abs(np.array(self.ours) - np.array(self.confidence))
        engine_difference = max(float(differences[same].max(initial=0.0)), ENGINE_DIFFERENCE_FLOOR)
        tie_margin = min(2 * engine_difference, MAXIMUM_TIE_MARGIN)
        margins = np.array(self.top) - np.array(self.ours)
        near_tie = ~same & (margins <= tie_margin)
        total = max(len(self.paths), 1)
        agreement = round(float(np.count_nonzero(same | near_tie)) / total, 6)
        return {
            "agreement": agreement,
            "top1_agreement": round(float(np.count_nonzero(same)) / total, 6),
            "near_ties": int(np.count_nonzero(near_tie)),
            "disagreements": int(np.count_nonzero(~same & ~near_tie)),
            "disagreeing_images": self._listing(~same & ~near_tie, margins),
            "near_tie_images": self._listing(near_tie, margins),
            "max_confidence_difference": round(float(differences.max(initial=0.0)), 6),
            "engine_difference": round(engine_difference, 6),
            "tie_margin": round(tie_margin, 6),
            "checked": len(self.paths),
            "minimum_agreement": minimum_agreement,
            "kept": agreement >= minimum_agreement,
        }

    def _listing(self, chosen: np.ndarray, margins: np.ndarray) -> list[dict[str, Any]]:
        return [
            {
                "path": self.paths[i],
                "evaluate": self.evaluate_class[i],
                "export": self.export_class[i],
                "evaluate_confidence": self.confidence[i],
                "margin": round(float(margins[i]), 6),
            }
            for i in np.flatnonzero(chosen)[:LISTED_IMAGES]
        ]


def _failure_line(figures: dict[str, Any]) -> str:
    examples = ", ".join(
        f"{item['path']} ({item['evaluate']} -> {item['export']}, margin {item['margin']:.3g})"
        for item in figures["disagreeing_images"][:5]
    )
    return (
        f"agreement {figures['agreement']:.2%} < {figures['minimum_agreement']:.0%} ({figures['disagreements']} of "
        f"{figures['checked']} differ beyond the tie margin {figures['tie_margin']:.2g}, e.g. {examples})"
    )


def _require_some_agreement(report: dict[str, Any], minimum: float) -> None:
    if any(figures["kept"] for figures in report.values()):
        return
    lines = [f"{name}: {_failure_line(figures)}" for name, figures in report.items()]
    raise ValueError(
        f"no exported format reproduces evaluate's test predictions (needs >= {minimum:.0%}, near ties counted):\n  "
        + "\n  ".join(lines)
        + "\nThe export is not written. Check that data/raw/images, models/head and the extract_features params are "
        "those evaluate used (`dvc repro` brings them in line)"
    )


def describe(report: dict[str, Any]) -> str:
    """One line for the log: each format's agreement with evaluate, and its latency or why it was dropped."""
    parts = []
    for name, figures in report["formats"].items():
        ties = f", {figures['near_ties']} near tie(s)" if figures.get("near_ties") else ""
        if figures.get("kept", True):
            parts.append(f"{name} {100 * figures['agreement']:.2f}% ({figures['latency_ms']:.1f} ms per image{ties})")
        else:
            parts.append(f"{name} {100 * figures['agreement']:.2f}% (dropped{ties})")
    selected = report.get("selected_images", report["checked_images"])
    of = f" (a sample of the {selected} selected)" if selected != report["checked_images"] else ""
    return f"agreement with evaluate on {report['checked_images']} test images{of}: {', '.join(parts)}"
