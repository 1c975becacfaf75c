"""The heads that fine-tune through DVC: on a stack with a tflite: member, the finetune head and
then the fusion head (a fine-tuned Keras member fused with a TFLite member's logistic head) train,
evaluate (the fused model and each member head alone) and export; predict on each export agrees
with evaluate. A real-data test on the capped mirror compares the fused model with its members."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import FLOWERS_ARCHIVE, FLOWERS_ARCHIVE_SHA256, WEIGHTS, require_mirror
from transferlab import cli

pytestmark = pytest.mark.slow
EDGETPU = "mobilenet_edgetpu_1.0_224_uint8_features.tflite"
LITE0 = "efficientnet_lite0_224_int8_features.tflite"
MOBILENET_V2_WEIGHTS = "mobilenet_v2_1.0_224_imagenet_dequant_no_top.h5"
MEMBER_FIGURES = {"weight", "test_accuracy", "test_macro_f1", "val_accuracy", "val_macro_f1"}


def read_json(project, path):
    return json.loads((project.root / path).read_text())


def predictions_of_the_export(project, capsys) -> tuple[list[str], list[str]]:
    """(predict on the export, evaluate's test predictions) for evaluate's test images."""
    rows = list(csv.DictReader((project.root / "metrics/evaluate/test_predictions.csv").open()))
    paths = [str(project.root / "data/raw/images" / row["path"]) for row in rows]
    assert cli.main(["predict", *paths, "--model", str(project.root / "models/export"), "--json"]) == 0
    predicted = [item["predictions"][0]["class"] for item in json.loads(capsys.readouterr().out)]
    return predicted, [row["predicted"] for row in rows]


def test_finetune_then_fusion_on_a_stack_with_a_tflite_member_through_dvc(dvc_project, capsys):
    """One project, [mobilenet_v2, tflite:EdgeTPU], for both heads that fine-tune (they share its DVC runs).

    1. ``head: finetune``: the Keras member is fine-tuned alone from its cached taps, evaluated and
       exported; a head parameter reruns neither extraction stage.
    2. ``head: fusion``: the fine-tuned member and the TFLite member's logistic head, fused; evaluate
       reports each member head alone; the fused export predicts what evaluate did.
    3. A cut point inside a residual block reruns extract_taps only, which says why it cannot cut there.
    """
    project = dvc_project
    edgetpu = require_mirror(WEIGHTS / EDGETPU)
    project.set_params(
        extract_features={"backbone": ["mobilenet_v2", f"tflite:{edgetpu}"], "engine": "auto"},
        train_head={"head": "finetune", "finetune": {"from_layer": "block_13_expand", "epochs": 2, "batch_size": 8}},
    )
    project.commit("finetune head")
    project.run(str(Path(sys.executable).parent / "dvc"), "repro", timeout=1800)  # TFLite conversions

    report = read_json(project, "metrics/extract_features.json")
    tapped = read_json(project, "metrics/extract_taps.json")
    taps = tapped["members"]["mobilenet_v2"]
    assert taps["layer"] == "block_13_expand" and taps["shape"] == [2, 2, 32] and taps["dtype"] == "float16"
    assert taps["computed"] == report["distinct_views"] == 54 and taps["cache_bytes"] > 0
    file_bytes = 0
    for split in ("train", "val", "test"):
        features = np.load(project.root / f"data/features/{split}.npz", allow_pickle=False)["features"]
        activations = np.load(project.root / f"data/taps/mobilenet_v2/{split}.npy", mmap_mode="r")
        assert activations.shape == (len(features), 2, 2, 32) and activations.dtype == np.float16
        file_bytes += (project.root / f"data/taps/mobilenet_v2/{split}.npy").stat().st_size
    assert taps["file_bytes"] == file_bytes
    assert set(report["backbones"]) == {"mobilenet_v2", edgetpu.stem}
    assert read_json(project, "data/taps/taps.json")["members"] == {"mobilenet_v2": "mobilenet_v2"}
    assert read_json(project, "data/taps/mobilenet_v2/taps.json")["layer"] == "block_13_expand"
    assert not (project.root / "data/features/taps").exists()
    assert {path.name for path in (project.root / "models/head").iterdir()} == {
        "head.json",
        "head.keras",
        "backbone.keras",
    }
    trained = read_json(project, "metrics/train_head.json")
    assert trained["head"] == "finetune" and trained["epochs_run"] == 2 and trained["from_layer"] == "block_13_expand"
    assert len((project.root / "metrics/train_head/val/loss.tsv").read_text().splitlines()) == 3  # header + 2 epochs
    evaluated = read_json(project, "metrics/evaluate.json")
    assert evaluated["provenance"]["head"] == "finetune" and evaluated["test"]["examples"] == 9
    exported = read_json(project, "metrics/export.json")
    assert exported["provenance"]["head"] == "finetune" and exported["formats"]["keras"]["top1_agreement"] >= 0.99
    predicted, expected = predictions_of_the_export(project, capsys)
    assert len(expected) == 9 and predicted == expected
    project.commit("baseline")

    # Only a head parameter changed: neither extract_features nor extract_taps runs, nothing is embedded.
    result = project.dvc("exp", "run", "-S", "train_head.finetune.epochs=1")
    assert "Running stage 'extract_features'" not in result.stdout
    assert "Running stage 'extract_taps'" not in result.stdout
    assert "Running stage 'train_head'" in result.stdout and "Running stage 'evaluate'" in result.stdout
    assert read_json(project, "metrics/extract_features.json") == report
    assert read_json(project, "metrics/train_head.json")["epochs_run"] == 1

    # The fusion head on the same stack (fusion.from_layer auto: the same cut, so the taps are cache hits).
    project.restore()  # `dvc exp run` left the last experiment in the workspace: start from the baseline
    result = project.dvc("exp", "run", "-S", "train_head.head=fusion", "-S", "export.check_images=0")
    assert "Running stage 'extract_features'" not in result.stdout
    assert read_json(project, "metrics/extract_taps.json")["members"]["mobilenet_v2"]["cache_hits"] == 54
    trained = read_json(project, "metrics/train_head.json")
    keys = ["mobilenet_v2", "mobilenet_edgetpu_1_0_224_uint8_features"]
    assert trained["head"] == "fusion" and sorted(trained["weights"]) == sorted(keys)  # JSON keys are sorted
    assert [trained["members"][key]["head"] for key in keys] == ["finetune", "logistic"]
    assert sum(trained["weights"].values()) == pytest.approx(1.0)

    evaluated = read_json(project, "metrics/evaluate.json")
    assert evaluated["provenance"]["head"] == "fusion" and evaluated["test"]["examples"] == 9
    assert sorted(evaluated["members"]) == sorted(keys)
    for figures in evaluated["members"].values():
        assert set(figures) == MEMBER_FIGURES and all(isinstance(value, float) for value in figures.values())
    shown = project.dvc("exp", "show", "--csv").stdout.splitlines()[0]
    assert "members.mobilenet_v2.test_accuracy" in shown, shown  # dvc exp show flattens the scalars

    exported = read_json(project, "metrics/export.json")
    assert exported["provenance"]["layout"] == "fused" and exported["formats"]["tflite"]["top1_agreement"] >= 0.99
    manifest = read_json(project, "models/export/manifest.json")
    used = [key for key in keys if trained["weights"][key] > 0]  # a weight-0 member head is left out
    assert [entry["key"] for entry in manifest["fusion"]["heads"]] == used
    assert manifest["fusion"]["left_out"] == [key for key in keys if key not in used]
    assert [entry["head"] for entry in manifest["fusion"]["heads"]] == [trained["members"][key]["head"] for key in used]
    assert "file" not in manifest["members"][0]  # the tuned member runs whole, from its fused/ file
    assert ("file" in manifest["members"][1]) == (keys[1] in used)
    predicted, expected = predictions_of_the_export(project, capsys)
    assert predicted == expected

    # Another cut reruns extract_taps, never extract_features; one inside a residual block cannot be
    # cut: the stage says so and lists the cut points.
    project.restore()
    failed = project.dvc("exp", "run", "-S", "train_head.finetune.from_layer=block_14_depthwise", check=False)
    assert failed.returncode != 0
    assert "Running stage 'extract_taps'" in failed.stdout and "Running stage 'extract_features'" not in failed.stdout
    assert "cannot be cut in front of 'block_14_depthwise'" in failed.stderr and "block_14_expand" in failed.stderr


@pytest.mark.real_data
def test_on_the_capped_mirror_frozen_fusion_beats_or_matches_its_best_member_on_validation(dvc_project):
    """Frozen-only fusion of three real backbones, 40 photos per class (seconds of training).

    On 20 validation photos per class one photo is 1 point of accuracy, so "beats" is judged on
    validation log loss, which the weights are chosen by: the fused model's is at most its best
    member's (a weight of 1 on that member is a grid point), and its accuracy is at most one photo
    below the best member's (a different argmax on a tie can cost one).
    """
    project = dvc_project
    weights = str(require_mirror(WEIGHTS / MOBILENET_V2_WEIGHTS))
    lite0, edgetpu = require_mirror(WEIGHTS / LITE0), require_mirror(WEIGHTS / EDGETPU)
    project.set_params(
        download={"source": str(require_mirror(FLOWERS_ARCHIVE)), "sha256": FLOWERS_ARCHIVE_SHA256},
        split={"val_fraction": 0.2, "test_fraction": 0.3, "max_images_per_class": 40},
        augment={"copies": 0},
        extract_features={
            "backbone": ["mobilenet_v2", f"tflite:{lite0}", f"tflite:{edgetpu}"],
            "weights": {"mobilenet_v2": weights},
            "alpha": 1.0,
            "image_size": 224,
            "batch_size": 16,
            "engine": "auto",
        },
        train_head={"head": "fusion", "fusion": {"finetune": [], "frozen": "separate"}},
    )
    project.dvc("repro", "evaluate")
    evaluated = read_json(project, "metrics/evaluate.json")
    trained = read_json(project, "metrics/train_head.json")
    members = evaluated["members"]
    assert len(members) == 3 and evaluated["val"]["examples"] == 40
    best = max(members, key=lambda key: members[key]["val_accuracy"])
    assert trained["combiner"]["val_log_loss"] <= min(m["val_loss"] for m in trained["members"].values()) + 1e-6
    assert evaluated["val"]["accuracy"] >= members[best]["val_accuracy"] - 1 / 40, (evaluated["val"], members)
    # 60 test photos: one photo is 1.7 points; chance is 20% (test_real_accuracy asks 70% of one backbone)
    assert evaluated["test"]["accuracy"] >= 0.75, (evaluated["test"], members)


def test_a_member_head_of_weight_0_is_left_out_of_the_export_and_predictions_do_not_change(tmp_path):
    """Weights (1, 0): the export holds one backbone and one member head, and predicts what the head does."""
    import dataclasses

    import numpy as np
    from PIL import Image

    from transferlab.backbones import stack
    from transferlab.core import params
    from transferlab.export import fused, predict
    from transferlab.features import engines, files
    from transferlab.heads import train_head

    paths = [require_mirror(WEIGHTS / name) for name in (LITE0, EDGETPU)]
    settings = params.parse_section("extract_features", {"backbone": [f"tflite:{path}" for path in paths]})
    members = stack.resolve_members(settings, seed=0)
    rng = np.random.default_rng(0)
    backbones = [engines.TFLiteEngine(path) for path in paths]  # loaded once: widths now, features below
    widths = [int(engine.run(np.zeros((1, 224, 224, 3), np.uint8)).shape[1]) for engine in backbones]
    blocks = tuple(
        files.Block(spec=member.spec, weights=member.weights_identity, width=width, offset=sum(widths[:index]))
        for index, (member, width) in enumerate(zip(members, widths))
    )

    def split(rows):
        labels = np.arange(rows) % 3
        return files.Features(
            features=(rng.normal(size=(rows, sum(widths))) + labels[:, None]).astype(np.float32),
            labels=labels,
            class_names=("a", "b", "c"),
            blocks=blocks,
            source="generated",
        )

    options = params.TrainHeadParams(head="fusion", fusion={"finetune": [], "frozen": "separate"}).head_options()
    options["logistic_options"] = {**options["logistic_options"], "c_grid": [0.1]}
    outcome = train_head.train_head(
        head="fusion", train=split(30), val=split(15), seed=0, class_weight="none", options=options
    )
    head = dataclasses.replace(outcome.head, weights=np.array([1.0, 0.0]))
    train_head.save_head(head, tmp_path / "head")
    (tmp_path / "export").mkdir()
    manifest = fused.write_fused(
        tmp_path / "export", members=members, head=head, head_folder=tmp_path / "head", seed=0, max_image_pixels=10**8
    )
    keys = [member.key for member in head.members]
    assert [entry["key"] for entry in manifest["fusion"]["heads"]] == keys[:1]
    assert manifest["fusion"]["left_out"] == keys[1:]
    assert "file" in manifest["members"][0] and "file" not in manifest["members"][1]  # its backbone is not written

    pictures = [Image.fromarray(rng.integers(0, 256, size=(60 + 17 * i, 90, 3), dtype=np.uint8)) for i in range(4)]
    exported = predict.load(tmp_path / "export").predict(pictures)
    pixels = predict.resize_all(pictures, [224])[224]
    features = np.concatenate([engine.run(pixels) for engine in backbones], axis=1)
    np.testing.assert_allclose(exported, head.predict_proba(features), rtol=1e-6, atol=1e-9)
