"""Suspected label errors: confident learning (cleanlab) on out-of-sample probabilities of every image.

Confident learning needs, for every image, class probabilities from a model that did not train on
that image. They come from what the pipeline already has, so nothing is embedded again:

- **train and validation**: a K-fold cross-validation of the logistic head (per-block
  standardization + multinomial logistic regression, the trained head's C when it is logistic)
  over the cached embeddings of the original images of train and val together. Augmented views
  are left out: a view of a held-out image in the training folds would leak its label. A few
  seconds on flower_photos.
- **test**: the trained head's own predictions, out of sample already.

``cleanlab.filter.find_label_issues`` flags the images whose given label disagrees with what
the others imply (per-class thresholds of average self-confidence, pruned by the estimated noise
rates), and ``cleanlab.rank.get_label_quality_scores`` scores them (self-confidence: the
probability of the given label; low = suspicious). The suggested label is the most probable
class. The user confirms them by eye (the gallery) and lists the confirmed ones in
``split.exclude``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from transferlab.features import files
from transferlab.reports import gallery

FOLDS = 5


@dataclass(frozen=True)
class Pool:
    """Every image with out-of-sample probabilities: where it is, its given label, the probabilities."""

    paths: tuple[str, ...]
    splits: tuple[str, ...]
    sha256: tuple[str, ...]
    labels: np.ndarray  # (N,) int
    probabilities: np.ndarray  # (N, C)
    class_names: tuple[str, ...]


def _originals(split: files.Features) -> np.ndarray:
    # Rows that are an image itself, not an augmented view (recipe "" is the original).
    recipes = split.recipes or ("",) * len(split)
    return np.array([recipe == "" for recipe in recipes], dtype=bool)


def cross_validated_probabilities(
    *, features: np.ndarray, labels: np.ndarray, widths: Sequence[int], c: float, seed: int, folds: int, max_iter: int
) -> np.ndarray:
    """Out-of-fold class probabilities of the logistic head (stratified, seeded folds).

    Raises:
        ValueError: a class has fewer than 2 images (no fold could hold it out and still train on it).
    """
    import threadpoolctl
    from sklearn import linear_model, model_selection, pipeline

    from transferlab.heads import logistic

    smallest = int(np.bincount(labels).min()) if len(labels) else 0
    if smallest < 2:
        raise ValueError(
            "label issues need at least 2 train+val images in every class for cross-validation; add images"
        )
    model = pipeline.Pipeline(
        [
            ("standardize", logistic.pipeline_standardizer(widths)),
            ("classify", linear_model.LogisticRegression(C=c, max_iter=max_iter, random_state=seed)),
        ]
    )
    splitter = model_selection.StratifiedKFold(n_splits=min(folds, smallest), shuffle=True, random_state=seed)
    # One thread: many small lbfgs steps (see heads/logistic.py for the measurement).
    with threadpoolctl.threadpool_limits(limits=1):
        return model_selection.cross_val_predict(model, features, labels, cv=splitter, method="predict_proba")


def out_of_sample_pool(
    *,
    train: files.Features,
    val: files.Features,
    test: files.Features,
    test_probabilities: np.ndarray,
    c: float,
    seed: int,
    folds: int = FOLDS,
    max_iter: int = 1000,
) -> Pool:
    """Out-of-sample probabilities for every original image of train, val (cross-validated) and test (the head).

    Args:
        train, val, test: the features files' contents (train may hold augmented views: left out).
        test_probabilities: the trained head's probabilities for ``test``'s rows, (N_test, C).
        c: the logistic head's inverse regularization.
        seed: seeds the folds and the solver.
        folds: cross-validation folds (fewer when a class is smaller).
        max_iter: lbfgs iterations per fit.
    """
    keep = _originals(train)
    parts = [
        ("train", train, keep),
        ("val", val, np.ones(len(val), dtype=bool)),
    ]
    features = np.concatenate([split.features[mask] for _, split, mask in parts])
    labels = np.concatenate([split.labels[mask] for _, split, mask in parts]).astype(np.int64)
    probabilities = cross_validated_probabilities(
        features=features, labels=labels, widths=train.widths, c=c, seed=seed, folds=folds, max_iter=max_iter
    )

    def column(name: str, split: files.Features, mask: np.ndarray) -> list[str]:
        values = getattr(split, name) or ("",) * len(split)
        return [value for value, kept in zip(values, mask) if kept]

    everything = [*parts, ("test", test, np.ones(len(test), dtype=bool))]
    return Pool(
        paths=tuple(value for _, split, mask in everything for value in column("paths", split, mask)),
        splits=tuple(name for name, split, mask in everything for _ in range(int(mask.sum()))),
        sha256=tuple(value for _, split, mask in everything for value in column("sha256", split, mask)),
        labels=np.concatenate([labels, test.labels.astype(np.int64)]),
        probabilities=np.concatenate([probabilities, np.asarray(test_probabilities, dtype=np.float64)]),
        class_names=tuple(train.class_names),
    )


@dataclass(frozen=True)
class Issue:
    """One suspected label error (a row of metrics/label_issues.csv)."""

    rank: int
    path: str
    split: str
    sha256: str
    given_label: str
    suggested_label: str
    score: float  # cleanlab's label quality: the probability of the given label (low = suspicious)


def find_issues(pool: Pool) -> list[Issue]:
    """The images cleanlab flags, most suspicious (lowest label quality) first."""
    from cleanlab import filter as cleanlab_filter
    from cleanlab import rank as cleanlab_rank

    flagged = cleanlab_filter.find_label_issues(
        labels=pool.labels, pred_probs=pool.probabilities, return_indices_ranked_by="self_confidence"
    )
    scores = cleanlab_rank.get_label_quality_scores(pool.labels, pool.probabilities, method="self_confidence")
    suggested = pool.probabilities.argmax(axis=1)
    names = pool.class_names
    return [
        Issue(
            rank=position,
            path=pool.paths[index],
            split=pool.splits[index],
            sha256=pool.sha256[index],
            given_label=names[pool.labels[index]],
            suggested_label=names[suggested[index]],
            score=float(scores[index]),
        )
        for position, index in enumerate(flagged.tolist(), 1)
    ]


def render(
    issues: Sequence[Issue],
    *,
    images_directory: str | os.PathLike,
    path: str | os.PathLike,
    images: int,
    examined: int,
    max_image_pixels: int,
) -> None:
    """Draws the ``images`` most suspicious issues as a gallery PNG (atomically)."""
    tiles = [
        gallery.Tile(
            path=issue.path,
            title=f"#{issue.rank} filed as {issue.given_label}\nlooks like {issue.suggested_label} ({issue.split})",
        )
        for issue in issues[:images]
    ]
    gallery.render_tile_groups(
        [("", tiles)],
        images_directory=images_directory,
        path=path,
        title=(
            f"Suspected label errors: {len(issues)} of {examined} images (cleanlab), "
            f"{len(tiles)} most suspicious shown\n(the folder it is filed under; the class the other images imply)"
        ),
        max_image_pixels=max_image_pixels,
        empty_text=f"No suspected label errors\namong {examined} images",
    )
