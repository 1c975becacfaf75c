"""The logistic head out of core: streaming standardization, then SGD on log loss over row chunks.

:mod:`transferlab.heads.logistic` fits lbfgs on the whole standardized training matrix (float64,
``rows x width x 8`` bytes: 10 GB for 10^6 MobileNetV2 rows). Above ``train_head.logistic.max_memory_gb``
it trains here instead, holding one chunk of :data:`CHUNK_ROWS` rows at a time, so the features
may be memory-mapped or read shard by shard:

1. **The same per-block standardization**, fitted in one streaming pass: per-column mean and
   variance merged chunk by chunk (Chan et al.'s parallel update, float64), then the
   :class:`transferlab.heads.base.BlockStandardizer` block factors. Equal to the in-memory fit up
   to float64 rounding.
2. **Every C of the grid at once**: one ``SGDClassifier(loss="log_loss")`` per C, each chunk fed
   to all of them (one read of the data per epoch, not one per C). C maps to SGD's ``alpha``
   through the objectives: lbfgs minimizes ``C * sum(loss) + |w|^2 / 2``, SGD
   ``mean(loss) + alpha * |w|^2 / 2``, so ``alpha = 1 / (C * rows)``.
3. **The same choice of C** on validation (scored chunk by chunk), by
   :func:`transferlab.heads.logistic.select`.

scikit-learn's SGD is one-vs-rest for several classes; the head keeps the per-class weight rows
and applies a softmax, like the in-memory head. Agreement with it is tested on generated features
and measured on flower_photos (README "Scaling").
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from transferlab.features import files
from transferlab.heads import base

if TYPE_CHECKING:  # imported where a head is trained: predict_proba (evaluate, export) needs no scikit-learn
    from sklearn import linear_model

LOGGER = logging.getLogger(__name__)
CHUNK_ROWS = 8192  # rows held at once: 8192 x 1280 float64 = 84 MB, whatever the dataset's size
EPOCHS = 10  # passes over the training rows; the validation scores stop moving after 5-8 on flower_photos


def matrix_gigabytes(rows: int, width: int) -> float:
    """The size in GB of the float64 standardized matrix that the in-memory head fits on."""
    return rows * width * 8 / 1e9


def chunks(count: int, rows: int = CHUNK_ROWS) -> Iterator[slice]:
    """Consecutive row ranges of at most ``rows`` rows covering ``count`` rows."""
    for start in range(0, count, rows):
        yield slice(start, min(start + rows, count))


def streaming_standardizer(features: np.ndarray, widths: Sequence[int]) -> base.BlockStandardizer:
    """The :class:`~transferlab.heads.base.BlockStandardizer` of ``features``, read one chunk at a time."""
    count, mean, squares = 0, np.zeros(features.shape[1]), np.zeros(features.shape[1])
    for rows in chunks(len(features)):
        chunk = np.asarray(features[rows], dtype=np.float64)
        chunk_mean = chunk.mean(axis=0)
        chunk_squares = ((chunk - chunk_mean) ** 2).sum(axis=0)
        total = count + len(chunk)
        delta = chunk_mean - mean
        squares += chunk_squares + delta**2 * count * len(chunk) / total
        mean += delta * len(chunk) / total
        count = total
    if count == 0:
        raise ValueError("cannot standardize: no training rows")
    deviation = np.sqrt(squares / count)
    deviation[deviation == 0.0] = 1.0  # a dead unit carries no information; leave it at 0 (as in memory)
    standardizer = base.BlockStandardizer(widths=tuple(int(width) for width in widths))
    return base.BlockStandardizer.from_arrays(standardizer.widths, mean, deviation * standardizer.block_factors())


def fit(
    train: files.Features, *, c_grid: Sequence[float], seed: int, class_weight: str | None
) -> tuple[base.BlockStandardizer, list[tuple[np.ndarray, np.ndarray]]]:
    """Fits one SGD logistic model per C over chunks; returns the standardizer and, per C, (coef, intercept).

    Args:
        train: the training split (its ``features`` may be a memory map).
        c_grid: the values of C, ascending.
        seed: seeds the row order of each epoch and SGD itself.
        class_weight: None, or ``balanced`` (weights computed from the labels, as scikit-learn does).
    """
    from sklearn import exceptions, linear_model

    standardizer = streaming_standardizer(train.features, train.widths)
    classes = np.arange(len(train.class_names))
    weights = _class_weights(train.labels, classes) if class_weight == "balanced" else None
    models = [
        linear_model.SGDClassifier(
            loss="log_loss", alpha=1.0 / (c * len(train)), class_weight=weights, random_state=seed, average=True
        )
        for c in c_grid
    ]
    rng = np.random.default_rng(seed)
    ranges = list(chunks(len(train)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", exceptions.ConvergenceWarning)  # partial_fit runs one pass per call
        for _ in range(EPOCHS):
            for index in rng.permutation(len(ranges)):
                rows = ranges[index]
                order = rng.permutation(rows.stop - rows.start)
                chunk = standardizer.transform(train.features[rows])[order]
                labels = np.asarray(train.labels[rows])[order]
                for model in models:
                    model.partial_fit(chunk, labels, classes=classes)
    return standardizer, [_softmax_weights(model) for model in models]


def predict_proba(standardizer: base.BlockStandardizer, coef, intercept, features: np.ndarray) -> np.ndarray:
    """Class probabilities of ``features``, computed chunk by chunk (the head's softmax)."""
    parts = [
        base.softmax(standardizer.transform(features[rows]) @ coef.T + intercept) for rows in chunks(len(features))
    ]
    return np.concatenate(parts) if parts else np.zeros((0, len(intercept)))


def _softmax_weights(model: linear_model.SGDClassifier) -> tuple[np.ndarray, np.ndarray]:
    coef, intercept = model.coef_.astype(np.float64), model.intercept_.astype(np.float64)
    if coef.shape[0] == 1:  # two classes: sigmoid(z) == softmax([0, z])
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept])
    return coef.copy(), intercept.copy()


def _class_weights(labels: np.ndarray, classes: np.ndarray) -> dict[int, float]:
    counts = np.bincount(np.asarray(labels), minlength=len(classes))
    return {int(label): len(labels) / (len(classes) * max(int(count), 1)) for label, count in zip(classes, counts)}
