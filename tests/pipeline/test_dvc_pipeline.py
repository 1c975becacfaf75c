"""The real DVC pipeline in a temporary git repository: dvc repro, dvc exp run, the cache."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def read_json(project, path):
    return json.loads((project.root / path).read_text())


def test_repro_through_extract_features_then_experiments_reuse_embeddings(dvc_project):
    project = dvc_project
    # The default engine, auto, once through DVC (support's projects ask for keras: no conversions).
    project.set_params(extract_features={"engine": "auto"})
    project.dvc("repro", "extract_features")

    index = list(csv.DictReader((project.root / "data/raw/index.csv").open()))
    assert len(index) == 36 and {row["status"] for row in index} == {"ok"}
    splits = {
        name: list(csv.DictReader((project.root / f"data/splits/{name}.csv").open()))
        for name in ("train", "val", "test")
    }
    assert [len(splits[name]) for name in ("train", "val", "test")] == [18, 9, 9]
    paths = [row["path"] for rows in splits.values() for row in rows]
    assert len(paths) == len(set(paths)) == 36
    augmented = list(csv.DictReader((project.root / "data/augmented/train.csv").open()))
    assert len(augmented) == 36 and sum(row["recipe"] == "" for row in augmented) == 18
    assert (project.root / "metrics/augment/preview.png").stat().st_size > 0

    first = read_json(project, "metrics/extract_features.json")
    assert first["embedded"] == 36 + 18 and first["random_init"] is True
    assert first["backbones"]["mobilenet_v2"]["engine"] == "tflite", "auto converts where TFLite agrees with Keras"
    train = np.load(project.root / "data/features/train.npz", allow_pickle=False)
    assert train["features"].shape == (36, 1280)
    assert "extract_features:" not in project.dvc("status").stdout, "everything up to extract_features is up to date"
    project.commit("baseline")

    # A change that leaves augment's output as it was does not re-run extract_features.
    project.dvc("exp", "run", "-S", "augment.preview_images=1")
    assert read_json(project, "metrics/extract_features.json") == first

    # One more view per image: only the new views are embedded.
    project.dvc("exp", "run", "-S", "augment.copies=2")
    second = read_json(project, "metrics/extract_features.json")
    assert second["embedded"] == 18 and second["cache_hits"] == 54

    # Back to the baseline: everything comes from the cache.
    project.dvc("exp", "run", "-S", "augment.copies=1", "-f")
    third = read_json(project, "metrics/extract_features.json")
    assert third["embedded"] == 0 and third["cache_hits"] == 54
