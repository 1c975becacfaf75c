"""The scratch head: the tutorial's CNN trained on the pixels of the split rows, saved, evaluated."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import support
from transferlab import heads
from transferlab.core import params
from transferlab.data import augment
from transferlab.features import files
from transferlab.heads import base, scratch, train_head
from transferlab.reports import evaluate

CLASSES = tuple(support.CLASS_COLOURS)
OPTIONS = {
    "image_size": 32,
    "augment": False,
    "dropout": 0.0,
    "epochs": 3,
    "batch_size": 8,
    "learning_rate": 0.003,
    "patience": 3,
    "decode_threads": 2,
}
CURVE_KEYS = {"train/loss", "train/accuracy", "val/loss", "val/accuracy"}
MAX_IMAGE_PIXELS = params.DownloadParams().max_image_pixels  # the stages pass params' download.max_image_pixels


def features_of(rows: list[dict], *, images_directory, name: str) -> files.Features:
    """A split of the given rows with placeholder feature columns (the scratch head ignores them)."""
    count = len(rows)
    return files.Features(
        features=np.zeros((count, 4), dtype=np.float32),
        labels=np.array([CLASSES.index(r["label"]) for r in rows]),
        class_names=CLASSES,
        blocks=(files.Block("mobilenet_v2", "random-init-seed0", 4, 0, "mobilenet_v2"),),
        paths=tuple(r["path"] for r in rows),
        sha256=tuple(r["sha256"] for r in rows),
        recipes=tuple(r["recipe"] for r in rows),
        source=f"{name}.npz",
        images_directory=images_directory,
        max_image_pixels=MAX_IMAGE_PIXELS,
    )


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """Colour classes: per class 10 train originals (each with one augmented view), 4 val, 4 test."""
    folder = support.write_dataset(tmp_path_factory.mktemp("photos"), per_class=18)
    rows = support.rows_for(folder)
    by_role: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for index, row in enumerate(rows):
        position = index % 18
        by_role["train" if position < 10 else "val" if position < 14 else "test"].append(row)
    recipe = augment.draw_recipe(
        np.random.default_rng(0), flip=True, zoom=0.2, rotation=15.0, brightness=0.1, contrast=0.1
    ).to_string()
    views = [{**row, "recipe": recipe} for row in by_role["train"]]
    by_role["train"] = by_role["train"] + views
    return {name: features_of(items, images_directory=folder, name=name) for name, items in by_role.items()}


def train_scratch(splits, *, log_step=None, seed=0, **overrides):
    return scratch.train(
        train=splits["train"],
        val=splits["val"],
        seed=seed,
        class_weight="none",
        log_step=log_step,
        **{**OPTIONS, **overrides},
    )


def test_the_model_is_the_tutorials():
    plain = scratch.build_model(classes=5, image_size=180, augment=False, dropout=0.0, seed=0)
    assert plain.count_params() == 3_989_285  # the tutorial's model.summary() for flower_photos
    assert [type(layer).__name__ for layer in plain.layers] == [
        "InputLayer",
        "Rescaling",
        "Conv2D",
        "MaxPooling2D",
        "Conv2D",
        "MaxPooling2D",
        "Conv2D",
        "MaxPooling2D",
        "Flatten",
        "Dense",
        "Dense",
    ]
    assert [layer.filters for layer in plain.layers if type(layer).__name__ == "Conv2D"] == [16, 32, 64]
    varied = scratch.build_model(classes=5, image_size=180, augment=True, dropout=0.2, seed=0)
    assert varied.count_params() == 3_989_285
    names = [type(layer).__name__ for layer in varied.layers]
    assert names[2:5] == ["RandomFlip", "RandomRotation", "RandomZoom"] and names[-4:-2] == ["Dropout", "Flatten"]
    assert varied.get_layer("dropout").rate == 0.2 and varied.get_layer("random_rotation").factor == (-0.1, 0.1)


def test_params_section_and_registry():
    settings = params.parse_section("train_head", {"head": "scratch", "scratch": {"augment": True, "epochs": 15}})
    assert settings.head_options() == {**params.ScratchParams().model_dump(), "augment": True, "epochs": 15}
    assert params.ScratchParams().image_size == 180 and params.ScratchParams().learning_rate == 0.001
    assert heads.reads_pixels("scratch") and not heads.reads_pixels("dense") and not heads.reads_pixels("logistic")
    with pytest.raises(ValueError, match=r"train_head\.scratch\.image_size"):
        params.parse_section("train_head", {"scratch": {"image_size": 4}})


@pytest.mark.slow
def test_trains_on_original_pixels_beats_chance_is_deterministic_and_round_trips(splits, tmp_path):
    steps: list[dict] = []
    outcome = train_scratch(splits, log_step=steps.append)
    report = outcome.report
    assert report["trained_on"] == 30 and len(splits["train"]) == 60  # originals only, not the augment stage's views
    assert report["epochs_run"] == len(steps) and 1 <= report["best_epoch"] <= len(steps)
    assert all(set(step) == CURVE_KEYS for step in steps)
    test_probabilities = base.predict_split(outcome.head, splits["test"])
    assert test_probabilities.shape == (12, 3) and np.allclose(test_probabilities.sum(axis=1), 1.0)
    assert (test_probabilities.argmax(axis=1) == splits["test"].labels).mean() > 0.6  # chance is 1/3

    again = train_scratch(splits)
    assert again.report == report
    np.testing.assert_array_equal(base.predict_split(again.head, splits["test"]), test_probabilities)

    train_head.save_head(outcome.head, tmp_path / "head")
    assert sorted(p.name for p in (tmp_path / "head").iterdir()) == ["head.json", "model.keras"]
    description = json.loads((tmp_path / "head" / "head.json").read_text())
    assert description["head"] == "scratch" and description["settings"]["image_size"] == 32
    loaded = heads.load_head(tmp_path / "head")
    np.testing.assert_allclose(base.predict_split(loaded, splits["test"]), test_probabilities, rtol=1e-6)
    with pytest.raises(ValueError, match="classifies images, not features"):
        loaded.predict_proba(splits["test"].features)


@pytest.mark.slow
def test_metrics_land_in_evaluate_with_the_logistic_schema(splits):
    logistic_options = params.LogisticParams().model_dump()
    transfer = train_head.train_head(
        head="logistic", train=splits["train"], val=splits["val"], seed=0, class_weight="none", options=logistic_options
    )
    result = train_head.train_head(
        head="scratch", train=splits["train"], val=splits["val"], seed=0, class_weight="balanced", options=OPTIONS
    )
    assert set(result.metrics["val"]) == set(transfer.metrics["val"]) == {"examples", "accuracy", "loss"}
    assert result.metrics["train"]["examples"] == 60 and result.metrics["val"]["accuracy"] > 0.6

    ours = evaluate.evaluate(head=result.head, val=splits["val"], test=splits["test"], gallery_images=4)
    theirs = evaluate.evaluate(head=transfer.head, val=splits["val"], test=splits["test"], gallery_images=4)
    assert set(ours.metrics) == set(theirs.metrics) == {"test", "val", "provenance"}
    for name in ("test", "val"):
        assert set(ours.metrics[name]) == set(theirs.metrics[name])
        assert set(ours.metrics[name]["per_class"]) == set(CLASSES)
    assert ours.metrics["val"]["accuracy"] == pytest.approx(result.metrics["val"]["accuracy"])
    origin = ours.metrics["provenance"]
    assert set(origin) == set(theirs.metrics["provenance"])
    assert origin["head"] == "scratch" and origin["backbone"] == "none" and origin["random_init"] is False
    assert theirs.metrics["provenance"]["random_init"] is True  # the placeholder block says random-init
    assert [row["path"] for row in ours.predictions] == list(splits["test"].paths)
    assert len(ours.confusion) == 12


def test_input_errors_say_what_to_do(splits, tmp_path):
    without_folder = {name: dataclasses.replace(split, images_directory=None) for name, split in splits.items()}
    with pytest.raises(ValueError, match="--images data/raw/images"):
        train_scratch(without_folder)
    elsewhere = {
        name: dataclasses.replace(split, images_directory=tmp_path / "absent") for name, split in splits.items()
    }
    with pytest.raises(ValueError, match="run the download stage"):
        train_scratch(elsewhere)
    without_limit = {name: dataclasses.replace(split, max_image_pixels=None) for name, split in splits.items()}
    with pytest.raises(ValueError, match=r"max_image_pixels \(params download.max_image_pixels\)"):
        train_scratch(without_limit)
    # The limit the splits carry (params download.max_image_pixels) is the one images are opened with.
    tiny_limit = {name: dataclasses.replace(split, max_image_pixels=100) for name, split in splits.items()}
    with pytest.raises(ValueError, match=r"too large .*raise download\.max_image_pixels"):
        train_scratch(tiny_limit)
    empty_val = {**splits, "val": scratch.subset(splits["val"], np.zeros(len(splits["val"]), dtype=bool))}
    with pytest.raises(ValueError, match="validation split is empty"):
        train_scratch(empty_val)
    (tmp_path / "photos").mkdir()
    with pytest.raises(ValueError, match=r"daisy/daisy_000\.jpg not found"):
        scratch.decode_views(
            images_directory=tmp_path / "photos",
            paths=["daisy/daisy_000.jpg"],
            recipes=[""],
            size=8,
            threads=1,
            max_image_pixels=MAX_IMAGE_PIXELS,
        )


def test_decoded_views_are_render_view_of_open_rgb(splits):
    from transferlab.data import images

    split = splits["train"]
    pixels = scratch.decode_views(
        images_directory=split.images_directory,
        paths=split.paths[-3:],
        recipes=split.recipes[-3:],
        size=24,
        threads=2,
        max_image_pixels=MAX_IMAGE_PIXELS,
    )
    assert pixels.dtype == np.uint8 and pixels.shape == (3, 24, 24, 3)
    for row, path, recipe in zip(pixels, split.paths[-3:], split.recipes[-3:]):
        image = images.open_rgb(split.images_directory / path, max_image_pixels=MAX_IMAGE_PIXELS)
        np.testing.assert_array_equal(row, augment.render_view(image, recipe, 24))
