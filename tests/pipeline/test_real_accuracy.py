"""The whole pipeline on the real flower_photos mirror (capped per class) with real weights.

A broken pipeline (wrong preprocessing, shuffled labels, features out of row order, a broken
engine) falls to chance, 20% for five classes; these runs must be far above it.
"""

from __future__ import annotations

import json

import pytest

from conftest import FLOWERS_ARCHIVE, FLOWERS_ARCHIVE_SHA256, WEIGHTS, require_mirror

pytestmark = [pytest.mark.slow, pytest.mark.real_data]

CASES = {
    "keras mobilenet alpha 0.25": {
        "backbone": "mobilenet",
        "alpha": 0.25,
        "weights": "mobilenet_v1_0.25_224_imagenet_no_top.h5",
    },
    "tflite efficientnet-lite0": {"backbone": "tflite:{weights}/efficientnet_lite0_224_int8_features.tflite"},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_capped_mirror_reaches_far_above_chance(case, dvc_project):
    project = dvc_project
    settings = dict(CASES[case])
    if "weights" in settings:
        settings["weights"] = str(require_mirror(WEIGHTS / settings["weights"]))
    settings["backbone"] = settings["backbone"].format(weights=WEIGHTS)
    require_mirror(WEIGHTS / "efficientnet_lite0_224_int8_features.tflite")
    project.set_params(
        download={"source": str(require_mirror(FLOWERS_ARCHIVE)), "sha256": FLOWERS_ARCHIVE_SHA256},
        split={"val_fraction": 0.2, "test_fraction": 0.3, "max_images_per_class": 40},
        augment={"copies": 0},
        extract_features={**settings, "image_size": 224, "batch_size": 16, "engine": "auto"},  # as users run it
    )
    project.dvc("repro")
    evaluation = json.loads((project.root / "metrics" / "evaluate.json").read_text())
    assert evaluation["test"]["examples"] == 60
    assert evaluation["provenance"]["random_init"] is False
    assert evaluation["test"]["accuracy"] >= 0.7, evaluation["test"]
    assert evaluation["test"]["macro_f1"] >= 0.65
