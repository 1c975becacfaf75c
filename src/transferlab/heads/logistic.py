"""The logistic-regression probe: per-block standardization, then multinomial logistic regression.

C (inverse regularization strength) is chosen on the validation split from a grid: each C is
fitted on the training split only, scored on validation, and the best one is kept as it was
fitted. It is deliberately not refitted on train + val, so that the validation figures stay an
honest estimate. The grid is walked from strong to weak regularization with warm starts, so each
fit starts from the previous solution; the whole sweep takes about a second on flower_photos.

Imports scikit-learn only to train, never TensorFlow: the train_head stage re-runs in a few seconds, and
loading a trained head (evaluate, export, predict) imports neither.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from transferlab.features import files
from transferlab.heads import base, logistic_streaming

if TYPE_CHECKING:  # scikit-learn is imported where a head is trained: loading one (evaluate, export) needs none
    from sklearn import pipeline

NAME = "logistic"
DETERMINISTIC = True  # lbfgs on the same rows gives the same model for any seed: train_head.seeds trains it once
WEIGHTS_FILE = "logistic.npz"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LogisticHead:
    """A fitted logistic head: standardizer statistics plus one weight row and bias per class."""

    description: base.HeadDescription
    standardizer: base.BlockStandardizer
    coef: np.ndarray  # (C, D), float64
    intercept: np.ndarray  # (C,), float64

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities (N, C) for raw features (N, D), computed a chunk of rows at a time."""
        return logistic_streaming.predict_proba(self.standardizer, self.coef, self.intercept, features)

    def save(self, folder: Path) -> None:
        """Writes standardizer.npz, logistic.npz and head.json into ``folder`` (no pickles)."""
        self.standardizer.save(folder / base.STANDARDIZER_FILE)
        base.save_arrays(folder / WEIGHTS_FILE, coef=self.coef, intercept=self.intercept)
        self.description.write(folder)


@dataclass(frozen=True)
class _Candidate:
    c: float
    head: LogisticHead
    scores: dict[str, float]
    converged: bool
    iterations: int


def train(
    *,
    train: files.Features,
    val: files.Features,
    seed: int,
    class_weight: str,
    c_grid: Sequence[float],
    max_iter: int,
    select_by: str,
    max_memory_gb: float = 4.0,
    log_step: base.StepLogger | None = None,
) -> base.TrainOutcome:
    """Fits one model per C on ``train``, keeps the one best on ``val``.

    Args:
        train: training features (augmented views included).
        val: validation features; may be empty only when ``c_grid`` holds one value.
        seed: seeds the solver (lbfgs itself is deterministic).
        class_weight: ``none``, or ``balanced`` to weight classes inversely to their frequency.
        c_grid: candidate values of C (> 0).
        max_iter: most lbfgs iterations per fit.
        select_by: ``accuracy`` (ties go to the lower validation loss) or ``log_loss``.
        max_memory_gb: RAM budget for the training matrix; above it the head trains out of core.
        log_step: called once per C, in ascending order, with train/val loss and accuracy.

    Returns:
        The chosen head, and a report with ``c``, ``converged``, ``iterations`` and ``solver``:
        ``lbfgs``, or ``lbfgs-streaming`` when the training matrix exceeds ``max_memory_gb`` (the
        same objective, summed over chunks of rows: :mod:`transferlab.heads.logistic_streaming`).
    """
    import threadpoolctl
    from sklearn import linear_model, pipeline

    base.check_trainable(train, val)
    grid = _checked_grid(c_grid, validation_rows=len(val), select_by=select_by)
    out_of_core = logistic_streaming.matrix_gigabytes(len(train), sum(train.widths)) > max_memory_gb
    model = pipeline.Pipeline(
        [
            ("standardize", pipeline_standardizer(train.widths)),
            (
                "classify",
                linear_model.LogisticRegression(
                    max_iter=max_iter,
                    class_weight=_sklearn_class_weight(class_weight),
                    warm_start=True,
                    random_state=seed,
                ),
            ),
        ]
    )
    settings = {
        "c_grid": grid,
        "max_iter": max_iter,
        "select_by": select_by,
        "class_weight": class_weight,
        "seed": seed,
    }
    # One thread: each lbfgs step is a few small matrix products, and OpenMP/BLAS thread hand-offs
    # cost more than they save (measured on flower_photos, 2 cores: 0.3 s per C on one thread,
    # 0.5-3 s on two, worst when other processes share the cores).
    if out_of_core:
        logger.info(
            "training matrix %.2f GB > train_head.logistic.max_memory_gb %g: lbfgs out of core, %d rows per chunk",
            logistic_streaming.matrix_gigabytes(len(train), sum(train.widths)),
            max_memory_gb,
            logistic_streaming.CHUNK_ROWS,
        )
        candidates = _fit_out_of_core(grid, train, val, settings, log_step)
    else:
        with threadpoolctl.threadpool_limits(limits=1):
            candidates = [_fit_one(model, c, train, val, settings, log_step) for c in grid]
    best = _select(candidates, select_by)
    if not best.converged:
        logger.warning("C=%g did not converge in %d iterations; raise train_head.logistic.max_iter", best.c, max_iter)
    logger.info(
        "chose C=%g %s", best.c, f"by validation {select_by}" if len(grid) > 1 else "(the only value in the grid)"
    )
    head = LogisticHead(
        description=base.description_for(NAME, train, {**settings, "c": best.c}, _files()),
        standardizer=best.head.standardizer,
        coef=best.head.coef,
        intercept=best.head.intercept,
    )
    return base.TrainOutcome(
        head=head,
        report={
            "c": best.c,
            "converged": best.converged,
            "iterations": best.iterations,
            "solver": "lbfgs-streaming" if out_of_core else "lbfgs",
        },
    )


def _checked_grid(c_grid: Sequence[float], *, validation_rows: int, select_by: str) -> list[float]:
    grid = sorted(float(c) for c in c_grid)
    if not grid or min(grid) <= 0:
        raise ValueError(f"train_head.logistic.c_grid must hold positive values, got {list(c_grid)}")
    if validation_rows == 0 and len(grid) > 1:
        raise ValueError(
            "choosing C needs validation images, but the validation split is empty; set split.val_fraction > 0 "
            "or give train_head.logistic.c_grid a single value"
        )
    if select_by not in ("accuracy", "log_loss"):
        raise ValueError(f"Unsupported select_by '{select_by}'; choose one of: accuracy, log_loss")
    return grid


def _fit_one(
    model: pipeline.Pipeline,
    c: float,
    train: files.Features,
    val: files.Features,
    settings: dict[str, Any],
    log_step: base.StepLogger | None,
) -> _Candidate:
    from sklearn import exceptions

    model.set_params(classify__C=c)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", exceptions.ConvergenceWarning)
        model.fit(train.features, train.labels)
    converged = not any(issubclass(item.category, exceptions.ConvergenceWarning) for item in caught)
    head = _head_from(model, train, settings)
    scores = _scores(head, train, "train")
    if len(val):
        scores.update(_scores(head, val, "val"))
    logger.info("C=%-8g %s%s", c, _format(scores), "" if converged else " (not converged)")
    if log_step is not None:
        log_step(scores)
    iterations = int(np.max(model.named_steps["classify"].n_iter_))
    return _Candidate(c=c, head=head, scores=scores, converged=converged, iterations=iterations)


def _fit_out_of_core(
    grid: list[float],
    train: files.Features,
    val: files.Features,
    settings: dict[str, Any],
    log_step: base.StepLogger | None,
) -> list[_Candidate]:
    standardizer, fitted = logistic_streaming.fit(
        train,
        c_grid=grid,
        max_iter=settings["max_iter"],
        class_weight=_sklearn_class_weight(settings["class_weight"]),
    )
    candidates = []
    for c, model in zip(grid, fitted, strict=True):
        description = base.description_for(NAME, train, settings, _files())
        head = LogisticHead(description, standardizer, model["coef"], model["intercept"])
        scores = _scores(head, train, "train")
        if len(val):
            scores.update(_scores(head, val, "val"))
        logger.info("C=%-8g %s%s", c, _format(scores), "" if model["converged"] else " (not converged)")
        if log_step is not None:
            log_step(scores)
        candidates.append(
            _Candidate(c=c, head=head, scores=scores, converged=model["converged"], iterations=model["iterations"])
        )
    return candidates


def pipeline_standardizer(widths: Sequence[int]) -> Any:
    """A :class:`transferlab.heads.base.BlockStandardizer` that is also a scikit-learn estimator.

    For ``Pipeline``, ``clone`` and cross-validation (``reports.label_issues``); the class is made
    on first use, so that importing this module imports no scikit-learn.
    """
    return _pipeline_standardizer_class()(widths=widths)


@functools.cache
def _pipeline_standardizer_class() -> type:
    from sklearn import base as sklearn_base

    class PipelineStandardizer(sklearn_base.TransformerMixin, sklearn_base.BaseEstimator, base.BlockStandardizer):
        """BlockStandardizer as a scikit-learn transformer (get_params/set_params from its ``widths``)."""

    return PipelineStandardizer


def _head_from(model: pipeline.Pipeline, train: files.Features, settings: dict[str, Any]) -> LogisticHead:
    """A :class:`LogisticHead` holding copies of the pipeline's fitted state."""
    standardizer = model.named_steps["standardize"]
    classifier = model.named_steps["classify"]
    if not np.array_equal(classifier.classes_, np.arange(len(train.class_names))):
        raise ValueError(f"{train.source}: labels must cover 0..{len(train.class_names) - 1} (the class_names)")
    coef, intercept = classifier.coef_.astype(np.float64), classifier.intercept_.astype(np.float64)
    if coef.shape[0] == 1:  # two classes: sigmoid(z) == softmax([0, z])
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept])
    return LogisticHead(
        description=base.description_for(NAME, train, settings, _files()),
        standardizer=base.BlockStandardizer.from_arrays(standardizer.widths, standardizer.mean_, standardizer.scale_),
        coef=coef.copy(),
        intercept=intercept.copy(),
    )


def _scores(head: LogisticHead, split: files.Features, prefix: str) -> dict[str, float]:
    figures = base.split_accuracy_and_loss(head, split)
    return {f"{prefix}/{key}": value for key, value in figures.items()}


def _select(candidates: list[_Candidate], select_by: str) -> _Candidate:
    if len(candidates) == 1:
        return candidates[0]
    if select_by == "log_loss":
        return min(candidates, key=lambda item: item.scores["val/loss"])
    # Ties in accuracy are common on a small validation split; the calibrated one wins.
    return min(candidates, key=lambda item: (-item.scores["val/accuracy"], item.scores["val/loss"]))


def _sklearn_class_weight(class_weight: str) -> str | None:
    if class_weight not in ("none", "balanced"):
        raise ValueError(f"Unsupported class_weight '{class_weight}'; choose one of: none, balanced")
    return None if class_weight == "none" else "balanced"


def _files() -> dict[str, str]:
    return {"standardizer": base.STANDARDIZER_FILE, "weights": WEIGHTS_FILE}


def _format(scores: dict[str, float]) -> str:
    return " ".join(f"{name} {value:.4f}" for name, value in scores.items())


def load(folder: Path, description: base.HeadDescription) -> LogisticHead:
    """Loads a head written by :meth:`LogisticHead.save`."""
    standardizer = base.BlockStandardizer.load(base.required_file(folder, base.STANDARDIZER_FILE))
    with np.load(base.required_file(folder, WEIGHTS_FILE), allow_pickle=False) as arrays:
        coef, intercept = arrays["coef"], arrays["intercept"]
    classes, width = len(description.class_names), description.feature_dim
    if coef.shape != (classes, width) or intercept.shape != (classes,) or standardizer.mean_.shape != (width,):
        raise ValueError(
            f"{folder}: saved weights {coef.shape} do not match head.json ({classes} classes, {width} features); "
            "re-run train_head"
        )
    return LogisticHead(description=description, standardizer=standardizer, coef=coef, intercept=intercept)
