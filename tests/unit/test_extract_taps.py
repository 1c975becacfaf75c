"""The extract_taps stage without TensorFlow: which members are tapped, the no-op, the data/taps contract."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPOSITORY_ROOT
from transferlab.backbones.stack import Member
from transferlab.features import extract_taps, files


def member(name: str, kind: str = "keras") -> Member:
    spec = f"tflite:{name}.tflite" if kind == "tflite" else name
    return Member(spec=spec, name=name, kind=kind, identity=name, weights_identity="w", image_size=32)


STACK = [member("edgetpu", "tflite"), member("mobilenet_v2"), member("mobilenet")]


def planned(plans) -> list[tuple[str, str]]:
    return [(plan.member.name, plan.layer) for plan in plans]


@pytest.mark.parametrize("head", ["logistic", "dense", "scratch"])
def test_heads_on_features_or_pixels_tap_nothing(head):
    assert extract_taps.plan_taps(STACK, head=head) == []


def test_finetune_taps_the_first_keras_member_of_a_stack_with_tflite_members():
    assert planned(extract_taps.plan_taps(STACK, head="finetune")) == [("mobilenet_v2", "auto")]
    chosen = extract_taps.plan_taps(STACK, head="finetune", finetune_from_layer="block_15_expand")
    assert planned(chosen) == [("mobilenet_v2", "block_15_expand")]
    assert planned(extract_taps.plan_taps(STACK[:2][::-1], head="finetune")) == [("mobilenet_v2", "auto")]


def test_finetune_on_tflite_files_only_says_what_to_do():
    with pytest.raises(ValueError, match="add a registry backbone"):
        extract_taps.plan_taps([member("edgetpu", "tflite")], head="finetune")


def test_fusion_taps_the_members_its_head_fine_tunes_at_their_layers(caplog):
    """The rule is backbones.fusion_plan's (tested there); here: the stage follows it, in stack order."""
    caplog.set_level(logging.INFO)
    everything = extract_taps.plan_taps(STACK, head="fusion")
    assert planned(everything) == [("mobilenet_v2", "block_13_expand"), ("mobilenet", "conv_dw_12")]
    assert "edgetpu is not fine-tuned (a TFLite file has no Keras layers to fine-tune)" in caplog.text
    listed = extract_taps.plan_taps(
        STACK, head="fusion", fusion_finetune=["mobilenet", "edgetpu"], fusion_from_layer={"mobilenet": "conv_dw_11"}
    )
    assert planned(listed) == [("mobilenet", "conv_dw_11")]
    assert extract_taps.plan_taps(STACK, head="fusion", fusion_finetune=[]) == []
    with pytest.raises(ValueError, match="mobilenet_v3, which is not in the stack; members: edgetpu"):
        extract_taps.plan_taps(STACK, head="fusion", fusion_finetune=["mobilenet_v3"])


def run_stage(tmp_path: Path, head: str, out: str) -> subprocess.CompletedProcess:
    """Runs stages/extract_taps.py in a fresh interpreter; prints the heavy modules it imported."""
    params = {"train_head": {"head": head}, "extract_features": {"backbone": "mobilenet_v2"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    argv = ["--images", "missing", "--splits", "missing", "--augmented", "missing.csv"]
    argv += ["--out", out, "--metrics", f"{out}.json", "--params", str(tmp_path / "params.yaml")]
    probe = (
        "import runpy, sys\n"
        f"sys.argv = ['extract_taps.py', *{argv!r}]\n"
        f"runpy.run_path({str(REPOSITORY_ROOT / 'stages' / 'extract_taps.py')!r}, run_name='__main__')\n"
        "print(sorted(name for name in ('tensorflow', 'keras', 'ai_edge_litert', 'sklearn') if name in sys.modules))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True, timeout=120
    )


def test_without_a_head_that_needs_taps_the_stage_is_a_no_op_without_tensorflow(tmp_path):
    logistic = run_stage(tmp_path, "logistic", "logistic")
    run_stage(tmp_path, "dense", "dense")
    assert logistic.stdout.strip().splitlines()[-1] == "[]", "the no-op imported TensorFlow, Keras or LiteRT"
    assert "nothing to extract" in logistic.stderr
    assert [path.name for path in (tmp_path / "logistic").iterdir()] == ["taps.json"]
    index = (tmp_path / "logistic" / "taps.json").read_bytes()
    assert index == (tmp_path / "dense" / "taps.json").read_bytes(), "the same bytes, whatever the head"
    assert json.loads(index)["members"] == {}
    assert files.load_taps(tmp_path / "logistic") == {}
    assert json.loads((tmp_path / "logistic.json").read_text())["members"] == {}


# ---------------------------------------------------------------- the data/taps contract


def rows(count: int, recipe: str = "original") -> dict[str, list[str]]:
    return {"sha256": [f"{index:064x}" for index in range(count)], "recipes": [recipe] * count}


def write_member(folder: Path, name: str, counts: dict[str, int]) -> None:
    """A member's taps as extract_taps writes them (tap_jobs.write_taps), without a backbone."""
    folder.mkdir(parents=True)
    for split, count in counts.items():
        np.save(folder / f"{split}.npy", np.full((count, 2, 2, 3), 0.5, dtype=np.float16))
    description = {
        "member": name,
        "layer": "block_13_expand",
        "rows": counts,
        "rows_sha256": {split: files.rows_digest(**rows(count)) for split, count in counts.items()},
        "backbone_file": "backbone.keras",
    }
    files.write_tap_description(folder, description)


def features(count: int, recipe: str = "original", source: str = "val.npz") -> files.Features:
    listed = rows(count, recipe)
    block = files.Block(spec="mobilenet_v2", weights="w", width=4, offset=0, name="mobilenet_v2")
    return files.Features(
        features=np.zeros((count, 4), np.float32),
        labels=np.zeros(count, np.int64),
        class_names=("a",),
        blocks=(block,),
        sha256=tuple(listed["sha256"]),
        recipes=tuple(listed["recipes"]),
        source=source,
    )


def test_taps_of_several_members_are_read_per_member_and_split(tmp_path):
    write_member(tmp_path / "mobilenet_v2", "mobilenet_v2", {"train": 5, "val": 3, "test": 2})
    write_member(tmp_path / "mobilenet", "mobilenet", {"train": 5, "val": 3, "test": 2})
    files.write_taps_index(tmp_path, {"mobilenet_v2": "mobilenet_v2", "mobilenet": "mobilenet"})
    loaded = files.load_taps(tmp_path)
    assert sorted(loaded) == ["mobilenet", "mobilenet_v2"]
    assert {split: tapped.activations.shape[0] for split, tapped in loaded["mobilenet"].items()} == {
        "train": 5,
        "val": 3,
        "test": 2,
    }
    tapped = loaded["mobilenet_v2"]["val"]
    assert (tapped.layer, tapped.block) == ("block_13_expand", "mobilenet_v2")
    assert tapped.backbone_file == tmp_path / "mobilenet_v2" / "backbone.keras"
    attached = files.attach_taps(features(3), "val", {name: by_split["val"] for name, by_split in loaded.items()})
    assert sorted(attached.taps) == ["mobilenet", "mobilenet_v2"]


def test_taps_made_for_other_rows_are_refused(tmp_path):
    write_member(tmp_path / "mobilenet_v2", "mobilenet_v2", {"val": 3})
    files.write_taps_index(tmp_path, {"mobilenet_v2": "mobilenet_v2"})
    val = files.load_taps(tmp_path, ("val",))["mobilenet_v2"]["val"]
    with pytest.raises(ValueError, match="made for other rows than val.npz; run `dvc repro`"):
        files.attach_taps(features(3, recipe="flip"), "val", {"mobilenet_v2": val})
    with pytest.raises(ValueError, match="other rows"):
        files.attach_taps(features(3), "test", {"mobilenet_v2": val})


def test_a_missing_or_broken_taps_folder_says_what_to_run(tmp_path):
    with pytest.raises(ValueError, match="run the extract_taps stage"):
        files.load_taps(tmp_path)
    write_member(tmp_path / "mobilenet_v2", "mobilenet_v2", {"val": 3})
    files.write_taps_index(tmp_path, {"mobilenet_v2": "mobilenet_v2"})
    np.save(tmp_path / "mobilenet_v2" / "val.npy", np.zeros((2, 2, 2, 3), np.float16))  # a row short
    with pytest.raises(ValueError, match="re-run extract_taps"):
        files.load_taps(tmp_path, ("val",))
    with pytest.raises(ValueError, match="missing or unreadable"):
        files.load_taps(tmp_path, ("test",))
