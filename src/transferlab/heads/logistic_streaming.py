"""The logistic head out of core: the in-memory head's model and objective, one chunk of rows at a time.

:mod:`transferlab.heads.logistic` fits lbfgs on the whole standardized training matrix (float64,
``rows x width x 8`` bytes: 10 GB for 10^6 MobileNetV2 rows). Above ``train_head.logistic.max_memory_gb``
it trains here instead, holding one chunk of :data:`CHUNK_ROWS` rows at a time. The features
files are memory-mapped (:func:`transferlab.features.files.load_features`) and each pass releases
a chunk's pages once it is used (:func:`transferlab.features.files.row_chunks`), so the process
holds one chunk of the file, not the file:

1. **The same per-block standardization**, fitted in one streaming pass: per-column mean and
   variance merged chunk by chunk (Chan et al.'s parallel update, float64), then the
   :class:`transferlab.heads.base.BlockStandardizer` block factors. Equal to the in-memory fit up
   to float64 rounding.
2. **The same model and objective**: multinomial logistic regression, mean log loss plus
   ``|W|^2 / (2 C rows)`` (scikit-learn's, intercepts unpenalized), minimized by scipy's L-BFGS
   with the loss and its gradient summed over chunks: one read of the rows per evaluation. The
   grid is walked from strong to weak regularization with warm starts, as in memory, so the
   head is the in-memory one up to the solvers' tolerance.

Why not SGD (``SGDClassifier(loss="log_loss").partial_fit``, the usual out-of-core recipe):
measured on 50k synthetic images (``benchmarks/scale.py``), its one-vs-rest models stayed 0.5-0.7
points of test accuracy below the in-memory head whatever the step size or number of epochs
(99.2-99.3% vs 99.8%), while the streamed objective is the in-memory one. The price is I/O: each
L-BFGS evaluation reads the training rows once (tens to a few hundred reads per grid), where SGD
would read them 10 times.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from transferlab.features import files
from transferlab.heads import base

CHUNK_ROWS = 8192  # rows held at once: 8192 x 1280 float64 = 84 MB, whatever the dataset's size
GRADIENT_TOLERANCE = 1e-4  # scikit-learn's default tol for lbfgs


def matrix_gigabytes(rows: int, width: int) -> float:
    """The size in GB of the float64 standardized matrix that the in-memory head fits on."""
    return rows * width * 8 / 1e9


def chunks(features: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
    """(row range, rows) of ``features``, :data:`CHUNK_ROWS` at a time: :func:`transferlab.features.files.row_chunks`.

    A memory-mapped features file's pages are released after each chunk, so a pass holds one chunk.
    """
    return files.row_chunks(features, CHUNK_ROWS)


def streaming_standardizer(features: np.ndarray, widths: Sequence[int]) -> base.BlockStandardizer:
    """The :class:`~transferlab.heads.base.BlockStandardizer` of ``features``, read one chunk at a time."""
    count, mean, squares = 0, np.zeros(features.shape[1]), np.zeros(features.shape[1])
    for _, rows in chunks(features):
        chunk = np.asarray(rows, dtype=np.float64)
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
    train: files.Features, *, c_grid: Sequence[float], max_iter: int, class_weight: str | None
) -> tuple[base.BlockStandardizer, list[dict]]:
    """Fits the multinomial logistic model for each C over chunks of rows, warm-starting each from the last.

    Args:
        train: the training split (its ``features`` may be a memory map).
        c_grid: the values of C, ascending.
        max_iter: most L-BFGS iterations per C.
        class_weight: None, or ``balanced`` (each class weighted inversely to its frequency, as scikit-learn does).

    Returns:
        The standardizer and, per C: ``coef`` (K, D), ``intercept`` (K,), ``converged``, ``iterations``.
    """
    from scipy import optimize

    standardizer = streaming_standardizer(train.features, train.widths)
    classes, width = len(train.class_names), int(sum(train.widths))
    labels = np.asarray(train.labels, dtype=np.int64)
    weights = _class_weights(labels, classes) if class_weight == "balanced" else np.ones(classes)
    total_weight = float(weights[labels].sum())
    # Two classes: class 0's logit is held at 0, so that softmax([0, z]) is scikit-learn's binomial sigmoid(z)
    # and the penalty falls on one weight vector, as there (a free softmax pair would halve it).
    free = np.ones((classes, width + 1), dtype=bool)
    if classes == 2:
        free[0] = False
    free = np.concatenate([free[:, :width].ravel(), free[:, width]])
    parameters = np.zeros(int(free.sum()))
    fitted = []
    for c in c_grid:

        def objective(values: np.ndarray, c: float = c) -> tuple[float, np.ndarray]:
            flat = np.zeros(len(free))
            flat[free] = values
            loss, gradient = _loss_and_gradient(flat, train.features, labels, standardizer, weights, classes)
            coef = flat[: classes * width]
            loss = loss / total_weight + coef @ coef / (2 * c * total_weight)
            gradient /= total_weight
            gradient[: classes * width] += coef / (c * total_weight)
            return loss, gradient[free]

        result = optimize.minimize(
            objective,
            parameters,
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": max_iter, "maxls": 50, "gtol": GRADIENT_TOLERANCE, "ftol": 64 * np.finfo(float).eps},
        )
        parameters = result.x
        flat = np.zeros(len(free))
        flat[free] = parameters
        fitted.append(
            {
                "coef": flat[: classes * width].reshape(classes, width),
                "intercept": flat[classes * width :],
                "converged": bool(result.nit < max_iter),
                "iterations": int(result.nit),
            }
        )
    return standardizer, fitted


def _loss_and_gradient(
    flat: np.ndarray,
    features: np.ndarray,
    labels: np.ndarray,
    standardizer: base.BlockStandardizer,
    weights: np.ndarray,
    classes: int,
) -> tuple[float, np.ndarray]:
    """The weighted sum of log losses and its gradient, one chunk of rows at a time (unnormalized, unpenalized)."""
    width = features.shape[1]
    coef, intercept = flat[: classes * width].reshape(classes, width), flat[classes * width :]
    loss, coef_gradient, intercept_gradient = 0.0, np.zeros((classes, width)), np.zeros(classes)
    for rows, raw in chunks(features):
        chunk, chunk_labels = _standardized(standardizer, raw), labels[rows]
        logits = chunk @ coef.T + intercept
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_normalizer = np.log(np.exp(shifted).sum(axis=1))
        row_weights = weights[chunk_labels]
        loss += float(row_weights @ (log_normalizer - shifted[np.arange(len(chunk)), chunk_labels]))
        residual = np.exp(shifted - log_normalizer[:, None])
        residual[np.arange(len(chunk)), chunk_labels] -= 1.0
        residual *= row_weights[:, None]
        coef_gradient += residual.T @ chunk
        intercept_gradient += residual.sum(axis=0)
    return loss, np.concatenate([coef_gradient.ravel(), intercept_gradient])


def predict_proba(standardizer: base.BlockStandardizer, coef, intercept, features: np.ndarray) -> np.ndarray:
    """Class probabilities of ``features``, computed chunk by chunk (the head's softmax)."""
    parts = [base.softmax(_standardized(standardizer, rows) @ coef.T + intercept) for _, rows in chunks(features)]
    return np.concatenate(parts) if parts else np.zeros((0, len(intercept)))


def _standardized(standardizer: base.BlockStandardizer, rows: np.ndarray) -> np.ndarray:
    """``standardizer.transform(rows)``, the same values, with one float64 copy instead of three."""
    if rows.ndim != 2 or rows.shape[1] != len(standardizer.mean_):
        return standardizer.transform(rows)  # its error message
    chunk = np.array(rows, dtype=np.float64)
    chunk -= standardizer.mean_
    chunk /= standardizer.scale_
    return chunk


def _class_weights(labels: np.ndarray, classes: int) -> np.ndarray:
    counts = np.bincount(labels, minlength=classes)
    return len(labels) / (classes * np.maximum(counts, 1))
