"""The finetune head on real photos with the shared MobileNetV2 weights, and its taps' cache (its run
through DVC shares a project with the fusion head's: tests/pipeline/test_fusion_pipeline.py)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

import support
from conftest import FLOWERS_ARCHIVE, WEIGHTS, require_mirror
from transferlab.backbones import stack
from transferlab.core import params
from transferlab.features import decode, extract_features, extract_taps, files

pytestmark = pytest.mark.slow
SHARED_MOBILENET_V2 = "mobilenet_v2_1.0_224_imagenet_dequant_no_top.h5"


def flower_subset(archive: Path, folder: Path, per_class: int) -> Path:
    """The first ``per_class`` photos of each class in the archive, extracted as class folders."""
    taken: dict[str, int] = {}
    with tarfile.open(archive) as handle:
        for member in handle:
            parts = member.name.split("/")
            if not (member.isfile() and len(parts) == 3 and parts[2].endswith(".jpg")):
                continue
            if taken.get(parts[1], 0) < per_class:
                taken[parts[1]] = taken.get(parts[1], 0) + 1
                member.name = f"{parts[1]}/{parts[2]}"
                handle.extract(member, folder, filter="data")
    return folder


@pytest.mark.real_data
def test_finetune_on_real_photos_is_far_above_chance_and_the_full_model_agrees(tmp_path):
    from transferlab.heads import base, finetune, train_head
    from transferlab.reports import evaluate

    archive = require_mirror(FLOWERS_ARCHIVE)
    weights = require_mirror(WEIGHTS / SHARED_MOBILENET_V2)
    folder = flower_subset(archive, tmp_path / "photos", per_class=60)
    rows = support.rows_for(folder)
    splits = {"train": [], "val": [], "test": []}
    for index, row in enumerate(rows):  # rows are sorted by class: each class gets 60% / 20% / 20%
        splits[("train", "train", "train", "val", "test")[index % 5]].append(row)
    settings = params.parse_section("extract_features", {"backbone": "mobilenet_v2", "weights": str(weights)})
    members = stack.resolve_members(settings, seed=0)
    common = {
        "rows_by_split": splits,
        "images_directory": folder,
        "cache_directory": tmp_path / "cache",
        "engine": "auto",
        "batch_size": 32,
        "threads": 2,
        "seed": 0,
        "max_image_pixels": 10**8,
    }
    features_folder = tmp_path / "features"
    feature_sets, _ = extract_features.extract_features(members=members, **common)
    files.write_feature_files(features_folder, feature_sets)
    plans = extract_taps.plan_taps(members, head="finetune")
    report = extract_taps.extract_taps(plans=plans, directory=tmp_path / "taps", **common)["members"]["mobilenet_v2"]
    assert report["layer"] == "block_13_expand" and report["shape"] == [14, 14, 96]
    assert report["engine"] == "tflite" and report["bytes_per_image"] == 14 * 14 * 96 * 2

    loaded = files.load_splits(features_folder, taps_directory=tmp_path / "taps")
    options = params.TrainHeadParams(head="finetune").head_options()
    result = train_head.train_head(
        head="finetune", train=loaded["train"], val=loaded["val"], seed=0, class_weight="none", options=options
    )
    evaluated = evaluate.evaluate(head=result.head, val=loaded["val"], test=loaded["test"], gallery_images=4)
    assert evaluated.metrics["test"]["examples"] == 60
    assert evaluated.metrics["test"]["accuracy"] > 0.6  # chance is 0.2

    train_head.save_head(result.head, tmp_path / "head")
    model = finetune.full_model(tmp_path / "head")
    test = loaded["test"]
    pixels = np.stack(
        [
            decode.render(decode.Item(sha, recipe, path), images_directory=folder, size=224, max_image_pixels=10**8)
            for sha, recipe, path in zip(test.sha256, test.recipes, test.paths)
        ]
    ).astype(np.float32)
    from_pixels = model.predict(pixels, batch_size=32, verbose=0)
    expected = base.predict_split(result.head, test)
    assert (from_pixels.argmax(axis=1) == expected.argmax(axis=1)).mean() >= 0.98


def test_taps_are_the_same_without_the_cache_and_a_corrupt_tap_is_recomputed(tmp_path):
    import sqlite3

    folder = support.write_dataset(tmp_path / "photos", per_class=4)
    rows = support.rows_for(folder)
    splits = {"train": rows[::2], "val": rows[1::4], "test": rows[3::4]}
    settings = params.parse_section("extract_features", support.SMALL_PARAMS["extract_features"])

    def run(cache, out):
        (member,) = stack.resolve_members(settings, seed=0)
        report = extract_taps.extract_taps(
            plans=[extract_taps.TapPlan(member, "block_15_expand")],
            rows_by_split=splits,
            images_directory=folder,
            cache_directory=cache,
            engine="keras",
            batch_size=4,
            threads=2,
            seed=0,
            max_image_pixels=10**8,
            directory=out,
        )
        return report["members"]["mobilenet_v2"], {
            split: np.load(out / "mobilenet_v2" / f"{split}.npy") for split in splits
        }

    cold, reference = run(tmp_path / "cache", tmp_path / "cold")
    assert cold["computed"] == len(rows) and cold["cache_hits"] == 0 and cold["layer"] == "block_15_expand"
    assert {name: array.shape[0] for name, array in reference.items()} == {
        name: len(split) for name, split in splits.items()
    }
    uncached, arrays = run(None, tmp_path / "uncached")
    assert uncached["computed"] == len(rows) and uncached["cache_bytes"] == 0
    for split in splits:
        np.testing.assert_array_equal(arrays[split], reference[split])

    (database,) = [path for path in (tmp_path / "cache").glob("*/*.sqlite") if "block_15_expand" in _description(path)]
    with sqlite3.connect(database) as connection:
        blob = bytearray(connection.execute("SELECT data FROM entries LIMIT 1").fetchone()[0])
        blob[3] ^= 0xFF
        connection.execute(
            "UPDATE entries SET data = ? WHERE rowid = (SELECT rowid FROM entries LIMIT 1)", (bytes(blob),)
        )
    warm, arrays = run(tmp_path / "cache", tmp_path / "warm")
    assert warm["corrupt_entries_recomputed"] == 1 and warm["computed"] == 1
    for split in splits:
        np.testing.assert_array_equal(arrays[split], reference[split])
    assert json.loads((tmp_path / "warm" / "mobilenet_v2" / "taps.json").read_text())["shape"] == cold["shape"]


def _description(database: Path) -> str:
    import sqlite3

    with sqlite3.connect(database) as connection:
        return connection.execute("SELECT value FROM meta WHERE name = 'description'").fetchone()[0]


def test_taps_of_two_keras_members_each_get_a_folder_and_a_warm_rerun_computes_none(tmp_path):
    """The fusion head's case: several members tapped at once, each image decoded once per input size."""
    folder = support.write_dataset(tmp_path / "photos", per_class=3)
    rows = support.rows_for(folder)
    splits = {"train": rows[::2], "val": rows[1::4], "test": rows[3::4]}
    values = {
        **support.SMALL_PARAMS["extract_features"],
        "backbone": ["mobilenet_v2", "mobilenet"],
        "alpha": {"mobilenet_v2": 0.35, "mobilenet": 0.25},
    }
    members = stack.resolve_members(params.parse_section("extract_features", values), seed=0)
    plans = extract_taps.plan_taps(members, head="fusion", fusion_from_layer={"mobilenet": "conv_dw_11"})
    assert [(plan.member.name, plan.layer) for plan in plans] == [
        ("mobilenet_v2", "block_13_expand"),
        ("mobilenet", "conv_dw_11"),
    ]

    def run(out):
        return extract_taps.extract_taps(
            plans=plans,
            rows_by_split=splits,
            images_directory=folder,
            cache_directory=tmp_path / "cache",
            engine="keras",
            batch_size=4,
            threads=2,
            seed=0,
            max_image_pixels=10**8,
            directory=out,
        )["members"]

    cold = run(tmp_path / "cold")
    assert {name: report["computed"] for name, report in cold.items()} == {
        "mobilenet_v2": len(rows),
        "mobilenet": len(rows),
    }
    warm = run(tmp_path / "warm")
    assert {name: (report["computed"], report["cache_hits"]) for name, report in warm.items()} == {
        "mobilenet_v2": (0, len(rows)),
        "mobilenet": (0, len(rows)),
    }
    loaded = files.load_taps(tmp_path / "warm")
    assert sorted(loaded) == ["mobilenet", "mobilenet_v2"]
    assert loaded["mobilenet"]["val"].layer == "conv_dw_11" and loaded["mobilenet_v2"]["val"].layer == "block_13_expand"
    for name, by_split in loaded.items():
        assert by_split["train"].backbone_file.is_file()
        for split, tapped in by_split.items():
            assert tapped.activations.shape[0] == len(splits[split]) and tapped.activations.dtype == np.float16
            cold_file = tmp_path / "cold" / files.tap_folder_name(name) / f"{split}.npy"
            np.testing.assert_array_equal(np.asarray(tapped.activations), np.load(cold_file))
