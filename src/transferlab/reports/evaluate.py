"""evaluate: the trained head on the test split, validation beside it, and what produced them.

Metrics are computed with NumPy, the way scikit-learn defines them (``zero_division=0``; tested
against scikit-learn): importing it cost evaluate 1.5-2 s of the head loop's 15 s (issue 15).
The plots are data for DVC's confusion template (one row per test image: actual and predicted
class name), a per-image predictions file that the export stage checks its model against
(written by :mod:`transferlab.data.tables`), and a PNG gallery of the most confidently wrong
test images (:mod:`transferlab.reports.gallery`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferlab import heads
from transferlab.features import files
from transferlab.heads import base, seeds
from transferlab.reports import gallery

TOP_K = 2
logger = logging.getLogger(__name__)


def classification_metrics(
    *, labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
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
    predictions = probabilities.argmax(axis=1)
    confusion = np.zeros((len(class_names), len(class_names)), dtype=np.int64)  # rows: actual class
    np.add.at(confusion, (labels, predictions), 1)
    hits, support, predicted = np.diag(confusion), confusion.sum(axis=1), confusion.sum(axis=0)
    precision, recall = _share(hits, predicted), _share(hits, support)
    f1 = _share(2 * hits, predicted + support)  # 2 tp / (2 tp + fp + fn), as scikit-learn computes it
    return {
        "examples": int(len(labels)),
        "accuracy": float(np.mean(predictions == labels)),
        "balanced_accuracy": float(np.mean(recall[support > 0])),  # classes present in the labels
        "macro_f1": float(np.mean(f1)),
        f"top{TOP_K}_accuracy": top_k_accuracy(labels, probabilities, k=TOP_K),
        "log_loss": log_loss(labels, probabilities),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
    }


def _share(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (scikit-learn's ``zero_division=0``)."""
    return np.divide(numerator, denominator, out=np.zeros(len(numerator)), where=denominator > 0)


def log_loss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean cross-entropy of the true classes, probabilities clipped to [eps, 1 - eps] as scikit-learn does."""
    probabilities = np.asarray(probabilities)
    if not np.issubdtype(probabilities.dtype, np.floating):
        probabilities = probabilities.astype(np.float64)
    eps = np.finfo(probabilities.dtype).eps
    chosen = np.clip(probabilities[np.arange(len(labels)), labels], eps, 1 - eps)
    return float(np.mean(-np.log(chosen)))


def top_k_accuracy(labels: np.ndarray, probabilities: np.ndarray, *, k: int) -> float:
    """Share of rows whose true class is among the ``k`` most probable (1.0 when k >= classes).

    Ties are broken as scikit-learn's ``top_k_accuracy_score`` does (the higher class index first).
    """
    classes = probabilities.shape[1]
    if k >= classes:
        return 1.0
    ranked = np.argsort(probabilities, axis=1, kind="mergesort")[:, ::-1][:, :k]
    return float(np.mean((ranked == np.asarray(labels)[:, None]).any(axis=1)))


def provenance(
    *, description: base.HeadDescription, features: files.Features, extract_report: Mapping[str, Any] | None = None
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
        return {
            "head": description.head,
            "head_settings": description.settings,
            "backbone": "none",
            "blocks": {},
            "engine": "keras",
            "random_init": False,
        }
    reported = {
        entry.get("spec"): entry
        for entry in dict((extract_report or {}).get("backbones") or {}).values()
        if isinstance(entry, Mapping)
    }
    recorded = features.block_engines
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
        "backbone": files.stack_name(features.blocks),
        "blocks": blocks,
        "engine": "+".join(engines),
        "random_init": any(entry["random_init"] for entry in blocks.values()),
    }


@dataclass(frozen=True)
class Evaluation:
    """Everything the evaluate stage writes, in memory."""

    metrics: dict[str, Any]
    confusion: list[dict[str, str]]
    predictions: list[dict[str, Any]]
    mistakes: list[gallery.Mistake]


def evaluate(
    *,
    head: base.TrainedHead,
    val: files.Features,
    test: files.Features,
    gallery_images: int,
    extract_report: Mapping[str, Any] | None = None,
    seed_record: seeds.Record | None = None,
    other_seeds: Iterable[tuple[int, base.TrainedHead]] = (),
) -> Evaluation:
    """Runs ``head`` on val and test and assembles metrics, confusion rows, predictions, mistakes.

    Args:
        head: the trained (with several seeds, the kept) head; every figure but ``seeds`` is its.
        val, test: the splits' features.
        gallery_images: how many confident mistakes the gallery shows.
        extract_report: metrics/extract_features.json, for the provenance.
        seed_record: models/head/seeds.json when train_head ran several seeds: adds ``seeds``
            (:func:`seeds_summary`).
        other_seeds: ``(k, head)`` of every other trained seed (loaded lazily, one at a time).

    Raises:
        ValueError: the test split is empty, or the features do not match the head.
    """
    if len(test) == 0:
        raise ValueError(f"{test.source} has no rows; evaluation needs test images (set split.test_fraction > 0)")
    for split in (val, test):
        head.description.check_features(split)
    class_names = head.description.class_names
    members = getattr(head, "member_probabilities", None)  # a fused model (the fusion head): its members too
    test_members, val_members = (members(test), members(val)) if members else ({}, {})
    test_probabilities = head.combine_members(test_members) if members else base.predict_split(head, test)
    val_probabilities = head.combine_members(val_members) if members else base.predict_split(head, val)
    report = {
        "test": classification_metrics(labels=test.labels, probabilities=test_probabilities, class_names=class_names),
        "val": classification_metrics(labels=val.labels, probabilities=val_probabilities, class_names=class_names),
        "provenance": provenance(description=head.description, features=test, extract_report=extract_report),
    }
    if seed_record is not None:
        kept = {"val": val_probabilities, "test": test_probabilities}
        report["seeds"] = seeds_summary(record=seed_record, kept=kept, others=other_seeds, val=val, test=test)
    if members:
        report["members"] = member_metrics(head, test=(test, test_members), val=(val, val_members))
    if report["provenance"]["random_init"]:
        logger.warning("random-init backbone weights: these figures say nothing about real accuracy")
    predictions = test_probabilities.argmax(axis=1)
    return Evaluation(
        metrics=report,
        confusion=confusion_rows(labels=test.labels, predictions=predictions, class_names=class_names),
        predictions=prediction_rows(features=test, probabilities=test_probabilities),
        mistakes=gallery.confident_mistakes(features=test, probabilities=test_probabilities, limit=gallery_images),
    )


SEED_FIGURES = ("test_accuracy", "val_accuracy", "test_macro_f1", "val_macro_f1")


def seeds_summary(
    *,
    record: seeds.Record,
    kept: Mapping[str, np.ndarray],
    others: Iterable[tuple[int, base.TrainedHead]],
    val: files.Features,
    test: files.Features,
) -> dict[str, Any]:
    """Mean and std across seeds of test/val accuracy and macro-F1, and the seed ensemble's figures.

    The std is the sample standard deviation (ddof=1) across the trained seeds, 0 when one was
    trained (a deterministic head). The ensemble averages the seeds' probabilities.

    Args:
        record: models/head/seeds.json.
        kept: the kept head's probabilities on ``val`` and ``test``.
        others: ``(k, head)`` of every other trained seed.
        val, test: the splits' features.

    Returns:
        Scalars (``dvc exp show`` columns): ``requested``, ``count`` (trained), ``kept``,
        ``<figure>_mean`` and ``<figure>_std`` for each of :data:`SEED_FIGURES`, and
        ``ensemble`` (``test_accuracy``, ``test_macro_f1``, ``val_accuracy``, ``val_macro_f1``).
    """
    splits = {"val": val, "test": test}
    probabilities: dict[int, Mapping[str, np.ndarray]] = {record.kept: kept}
    for k, head in others:
        for split in splits.values():
            head.description.check_features(split)
        probabilities[k] = {name: base.predict_split(head, split) for name, split in splits.items()}
    if sorted(probabilities) != list(range(record.trained)):
        raise ValueError(
            f"seeds {sorted(probabilities)} evaluated, but {record.trained} were trained; re-run train_head"
        )
    figures = [_split_figures(splits, probabilities[k]) for k in sorted(probabilities)]
    summary: dict[str, Any] = {"requested": record.requested, "count": record.trained, "kept": record.kept}
    for name in SEED_FIGURES:
        values = np.array([figure[name] for figure in figures if figure.get(name) is not None], dtype=np.float64)
        summary[f"{name}_mean"] = float(values.mean()) if len(values) else None
        summary[f"{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else (0.0 if len(values) else None)
    averaged = {name: np.mean([probabilities[k][name] for k in probabilities], axis=0) for name in splits}
    summary["ensemble"] = _split_figures(splits, averaged)
    return summary


def _split_figures(splits: Mapping[str, files.Features], probabilities: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """``{split}_accuracy`` and ``{split}_macro_f1`` (None for an empty split) of one set of predictions."""
    figures: dict[str, Any] = {}
    for name in ("test", "val"):
        split = splits[name]
        metrics = classification_metrics(
            labels=split.labels, probabilities=probabilities[name], class_names=split.class_names
        )
        figures[f"{name}_accuracy"] = metrics.get("accuracy")
        figures[f"{name}_macro_f1"] = metrics.get("macro_f1")
    return figures


def member_metrics(
    head: Any,
    *,
    test: tuple[files.Features, Mapping[str, np.ndarray]],
    val: tuple[files.Features, Mapping[str, np.ndarray]],
) -> dict[str, dict[str, float]]:
    """Each member head of a fused model alone: test and val accuracy and macro-F1, and its weight.

    Scalars keyed by member (``members.<key>.test_accuracy``), so that ``dvc exp show`` shows
    what fusion adds over its best member.

    Args:
        head: a fused head (:class:`transferlab.heads.fusion.FusionHead`).
        test: the test split and each member's probabilities on it (by key).
        val: the same for validation.
    """
    names = head.description.class_names
    report: dict[str, dict[str, float]] = {}
    for member, weight in zip(head.members, head.weights):
        figures: dict[str, float] = {"weight": float(weight)}
        for prefix, (split, probabilities) in (("test", test), ("val", val)):
            scores = classification_metrics(
                labels=split.labels, probabilities=probabilities[member.key], class_names=names
            )
            if "accuracy" in scores:
                figures.update({f"{prefix}_accuracy": scores["accuracy"], f"{prefix}_macro_f1": scores["macro_f1"]})
        report[member.key] = figures
    return report


def describe(metrics: Mapping[str, Any]) -> str:
    """One line for the log: the stack and head, and their test figures (metrics/evaluate.json)."""
    test, origin = metrics["test"], metrics["provenance"]
    members = "".join(
        f"; member {key}: accuracy {figures['test_accuracy']:.4f} (weight {figures['weight']:.2f})"
        for key, figures in metrics.get("members", {}).items()
    )
    return (
        f"{origin['backbone']} + {origin['head']} head on {test['examples']} test images: "
        f"accuracy {test['accuracy']:.4f}, balanced accuracy {test['balanced_accuracy']:.4f}, "
        f"macro-F1 {test['macro_f1']:.4f}, top-{TOP_K} {test[f'top{TOP_K}_accuracy']:.4f}{members}"
    )


def confusion_rows(*, labels: np.ndarray, predictions: np.ndarray, class_names: Sequence[str]) -> list[dict[str, str]]:
    """One ``{"actual", "predicted"}`` row of class names per image (DVC's confusion template)."""
    return [
        {"actual": class_names[a], "predicted": class_names[p]} for a, p in zip(labels.tolist(), predictions.tolist())
    ]


def prediction_rows(*, features: files.Features, probabilities: np.ndarray) -> list[dict[str, Any]]:
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


def read_extract_report(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """Reads metrics/extract_features.json; ``None`` when no path is given or the file is absent."""
    if path is None or not Path(path).is_file():
        return None
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); re-run extract_features") from None
    return report if isinstance(report, dict) else None
