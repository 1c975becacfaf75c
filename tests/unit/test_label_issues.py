"""Suspected label errors on generated embeddings with planted flipped labels.

Five well-separated Gaussian classes in 32 dimensions (a held-out accuracy near 100% on clean
labels), with 8% of the labels of train, val and test each flipped to another class. The test
asserts a recall of at least 80% of the planted flips, and that at least 70% of what is flagged
was planted (precision), for train/val (cross-validated) and test (the head's predictions) alike.
"""

from __future__ import annotations

import numpy as np
import pytest

from transferlab.features import files
from transferlab.reports import label_issues

CLASSES = ("daisy", "dandelion", "roses", "sunflowers", "tulips")
DIMENSIONS = 32


def make_split(name, per_class, rng, centres, *, augmented=0):
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    features = centres[labels] + rng.normal(0, 1.0, (len(labels), DIMENSIONS))
    paths = [f"{CLASSES[label]}/{name}_{index:03d}.jpg" for index, label in enumerate(labels)]
    recipes = [""] * len(labels)
    if augmented:  # views of the first images, which must not be scored (nor leak into the folds)
        features = np.concatenate([features, features[:augmented] + 0.01])
        labels = np.concatenate([labels, labels[:augmented]])
        paths += paths[:augmented]
        recipes += ['{"flip": true}'] * augmented
    return labels, files.Features(
        features=features.astype(np.float32),
        labels=labels,
        class_names=CLASSES,
        blocks=(files.Block(spec="generated", weights="none", width=DIMENSIONS, offset=0, name="generated"),),
        paths=tuple(paths),
        sha256=tuple(f"{index:064x}" for index in range(len(paths))),
        recipes=tuple(recipes),
    )


def flip(split, share, rng):
    """Plants wrong labels in ``share`` of the original rows; returns the new split and the planted paths."""
    originals = np.flatnonzero(np.array([recipe == "" for recipe in split.recipes]))
    chosen = rng.choice(originals, size=round(share * len(originals)), replace=False)
    labels = split.labels.copy()
    labels[chosen] = (labels[chosen] + rng.integers(1, len(CLASSES), len(chosen))) % len(CLASSES)
    by_path = {split.paths[index]: labels[index] for index in originals}
    labels = np.array([by_path[path] for path in split.paths])  # a view keeps its image's (new) label
    relabelled = files.Features(**{**vars(split), "labels": labels})
    return relabelled, {split.paths[index] for index in chosen}


@pytest.fixture(scope="module")
def planted():
    rng = np.random.default_rng(7)
    centres = rng.normal(0, 1.6, (len(CLASSES), DIMENSIONS))
    _, train = make_split("train", 60, rng, centres, augmented=40)
    _, val = make_split("val", 12, rng, centres)
    _, test = make_split("test", 16, rng, centres)
    train, planted_train = flip(train, 0.08, rng)
    val, planted_val = flip(val, 0.08, rng)
    test, planted_test = flip(test, 0.08, rng)
    # The "trained head": a logistic fit on the noisy training labels, as train_head would make it.
    from sklearn.linear_model import LogisticRegression

    head = LogisticRegression(C=1.0, max_iter=1000).fit(train.features, train.labels)
    pool = label_issues.out_of_sample_pool(
        train=train, val=val, test=test, test_probabilities=head.predict_proba(test.features), c=1.0, seed=0
    )
    return pool, label_issues.find_issues(pool), planted_train | planted_val, planted_test


def test_every_original_image_is_scored_once_and_views_are_left_out(planted):
    pool, _, _, _ = planted
    assert len(pool.paths) == 5 * (60 + 12 + 16)
    assert len(set(pool.paths)) == len(pool.paths)
    assert pool.probabilities.shape == (len(pool.paths), len(CLASSES))
    assert np.allclose(pool.probabilities.sum(axis=1), 1.0)
    assert pool.splits.count("train") == 300 and pool.splits.count("test") == 80


def test_most_planted_flips_are_found(planted):
    _, issues, planted_train_val, planted_test = planted
    flagged = {issue.path for issue in issues}
    for planted_paths in (planted_train_val, planted_test):
        recall = len(flagged & planted_paths) / len(planted_paths)
        assert recall >= 0.8, f"recall {recall:.2f} of {len(planted_paths)} planted flips"
    precision = len(flagged & (planted_train_val | planted_test)) / len(flagged)
    assert precision >= 0.7, f"precision {precision:.2f}: {len(flagged)} flagged"


def test_issues_are_ranked_most_suspicious_first_with_a_suggestion(planted):
    _, issues, planted_train_val, planted_test = planted
    assert [issue.rank for issue in issues] == list(range(1, len(issues) + 1))
    scores = [issue.score for issue in issues]
    assert scores == sorted(scores)  # self-confidence of the given label, lowest first
    top = issues[0]
    assert top.path in planted_train_val | planted_test
    assert top.suggested_label == top.path.split("/")[0] != top.given_label  # the folder is the true class here


def test_a_class_too_small_for_cross_validation_is_refused():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (len(CLASSES), DIMENSIONS))
    _, train = make_split("train", 1, rng, centres)
    _, val = make_split("val", 0, rng, centres)
    with pytest.raises(ValueError, match="at least 2 train\\+val images in every class"):
        label_issues.out_of_sample_pool(
            train=train, val=val, test=train, test_probabilities=np.full((5, 5), 0.2), c=1.0, seed=0
        )
