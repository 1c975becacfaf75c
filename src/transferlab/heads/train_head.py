"""train_head: train the chosen head on the features files, save it, report on it.

The head is trained on the training split (augmented views included) and judged on the
validation split; the test split is left to the evaluate stage. Per-step curves (epochs for
the dense head, the C grid for the logistic head) go to dvclive, for ``dvc plots show``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from transferlab import heads
from transferlab.core import atomic
from transferlab.features import files
from transferlab.heads import base

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingResult:
    """A trained head and the train_head metrics (metrics/train_head.json)."""

    head: base.TrainedHead
    metrics: dict[str, Any]


def train_head(
    *,
    head: str,
    train: files.Features,
    val: files.Features,
    seed: int,
    class_weight: str,
    options: Mapping[str, Any],
    log_step: base.StepLogger | None = None,
) -> TrainingResult:
    """Trains a head of kind ``head`` (see :mod:`transferlab.heads`) and measures it.

    Args:
        head: a registered head name, e.g. ``logistic`` or ``dense``.
        train: training features.
        val: validation features (C selection, early stopping, the reported val figures).
        seed: the run's seed (params ``base.seed``).
        class_weight: ``none`` or ``balanced``.
        options: the head's own settings, i.e. the fields of ``train_head.<head>`` in params.yaml.
        log_step: receives the per-step curves (see :func:`live_curves`).

    Returns:
        The head, and metrics: head, seconds (training time), train and val accuracy, loss and
        examples, plus what the head reports (``c`` for logistic; ``best_epoch`` and ``epochs_run``
        for dense and scratch).
    """
    logger.info(
        "training the %s head on %d rows, validating on %d (%d features, %d classes)",
        head,
        len(train),
        len(val),
        train.features.shape[1],
        len(train.class_names),
    )
    started = time.perf_counter()
    outcome = heads.train(
        head, train=train, val=val, seed=seed, class_weight=class_weight, log_step=log_step, **options
    )
    seconds = time.perf_counter() - started
    metrics: dict[str, Any] = {
        "head": head,
        "seconds": round(seconds, 3),
        "classes": len(train.class_names),
        "feature_dim": int(train.features.shape[1]),
    }
    for name, split in (("train", train), ("val", val)):
        metrics[name] = {"examples": len(split)}
        if len(split):
            metrics[name].update(base.accuracy_and_loss(base.predict_split(outcome.head, split), split.labels))
    metrics.update(outcome.report)
    return TrainingResult(head=outcome.head, metrics=metrics)


def describe(metrics: Mapping[str, Any]) -> str:
    """One line for the log: the head, its train and val accuracy and training time (metrics/train_head.json)."""
    val = metrics["val"]
    val_accuracy = f"{val['accuracy']:.4f}" if "accuracy" in val else "n/a (no validation rows)"
    return (
        f"{metrics['head']} head: train accuracy {metrics['train']['accuracy']:.4f}, val accuracy {val_accuracy}, "
        f"{metrics['seconds']:.1f} s"
    )


def save_head(head: base.TrainedHead, folder: str | os.PathLike) -> None:
    """Saves ``head`` into ``folder``, atomically: the folder is complete or left as it was."""
    with atomic.atomic_directory(folder) as temporary:
        head.save(temporary)


@contextlib.contextmanager
def live_curves(folder: str | os.PathLike) -> Iterator[base.StepLogger]:
    """Yields a ``log_step`` that appends each step's metrics to dvclive histories in ``folder``.

    ``folder`` ends up holding ``train/loss.tsv``, ``val/accuracy.tsv`` and so on (columns
    ``step`` and the metric, dvclive's format, what ``dvc plots`` reads) and nothing else; it is
    swapped in atomically when the block completes.
    """
    # dvclive's own history writer, without ``dvclive.Live``: Live inspects the enclosing git and
    # DVC repositories (it fails in a repository without commits, and runs ``dvc init`` in a git
    # repository that has no .dvc), which a pipeline stage must not do.
    from dvclive.plots import Metric

    with atomic.atomic_directory(folder) as temporary:
        histories: dict[str, Metric] = {}
        steps = itertools.count()

        def log_step(values: Mapping[str, float]) -> None:
            step = next(steps)
            for name, value in values.items():
                history = histories.setdefault(name, Metric(name, str(temporary)))
                history.step = step
                history.dump(float(value))

        yield log_step
        written = temporary / Metric.subfolder
        if written.is_dir():
            for item in sorted(written.iterdir()):
                os.replace(item, temporary / item.name)
            written.rmdir()
