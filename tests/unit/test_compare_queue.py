"""compare's queue: -S overrides applied as DVC applies them (for the prefetch), and failed rows' logs."""

from __future__ import annotations

from pathlib import Path

import pytest

from transferlab.reports import compare


def test_overrides_are_applied_as_yaml_values_without_touching_the_original():
    params = {"extract_features": {"backbone": "mobilenet_v2", "alpha": 1.0}, "split": {"val_fraction": 0.1}}
    merged = compare.apply_overrides(
        params,
        [
            "extract_features.alpha={mobilenet_v2: 0.35, mobilenet: 0.25}",
            "extract_features.backbone=[mobilenet, mobilenet_v2]",
            "train_head.logistic.c_grid=[0.1, 1.0]",
        ],
    )
    assert merged["extract_features"] == {
        "backbone": ["mobilenet", "mobilenet_v2"],
        "alpha": {"mobilenet_v2": 0.35, "mobilenet": 0.25},
    }
    assert merged["train_head"] == {"logistic": {"c_grid": [0.1, 1.0]}}
    assert params["extract_features"]["alpha"] == 1.0
    with pytest.raises(ValueError, match="is not KEY=VALUE"):
        compare.apply_overrides(params, ["extract_features.alpha"])
    with pytest.raises(ValueError, match="'val_fraction' is a value, not a section"):
        compare.apply_overrides(params, ["split.val_fraction.x=1"])


def test_only_overrides_of_the_data_stages_make_a_prefetch_incomplete():
    overrides = ["extract_features.alpha=0.5", "split.max_images_per_class=40", "base.seed=1", "train_head.head=dense"]
    assert compare.data_overrides(overrides) == ["split.max_images_per_class=40", "base.seed=1"]


def test_a_failed_experiment_shows_its_log_in_its_row():
    row = compare.Row(
        experiment="cmp-mobilenet",
        backbone="mobilenet@0.25",
        test_accuracy=0.9,
        macro_f1=0.88,
        val_accuracy=0.87,
        milliseconds_per_image=5.0,
        head_seconds=1.0,
        parameters=1000,
        random_init=False,
    )
    table = compare.format_table([row], {"cmp-nosuchnet": Path("logs/compare/cmp-nosuchnet.log"), "cmp-x": None})
    lines = table.splitlines()
    assert lines[2].split()[-1] == "cmp-mobilenet"
    assert "FAILED, log: logs/compare/cmp-nosuchnet.log" in lines[3] and lines[3].rstrip().endswith("cmp-nosuchnet")
    assert "FAILED (no log" in lines[4]
