"""The course's table through the real pipeline: benchmarks/course_table.py in a temporary DVC project."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPOSITORY_ROOT

pytestmark = pytest.mark.slow

NAMES = ("course-scratch", "course-scratch-augment", "course-transfer")
SMALL = [
    "-S",
    "train_head.scratch.image_size=32",
    "-S",
    "train_head.scratch.epochs=2",
    "-S",
    "train_head.scratch.batch_size=8",
    "-S",
    "train_head.scratch.learning_rate=0.003",
    "-S",
    "train_head.dense.epochs=2",
    "-S",
    "train_head.dense.units=16",
]


def load_script():
    spec = importlib.util.spec_from_file_location("course_table", REPOSITORY_ROOT / "benchmarks" / "course_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def shown_experiments(project) -> dict[str, dict]:
    """name -> {"params": params.yaml content, "metrics": path -> content} from ``dvc exp show --json``."""
    found = {}

    def walk(node):
        if isinstance(node, dict):
            data = node.get("data")
            if node.get("name") in NAMES and isinstance(data, dict) and "metrics" in data:
                found[node["name"]] = {
                    "params": data["params"]["params.yaml"]["data"],
                    "metrics": {path: item["data"] for path, item in data["metrics"].items()},
                }
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(project.dvc("exp", "show", "--json").stdout))
    return found


def test_three_experiments_land_in_exp_show_with_one_table(dvc_project):
    project = dvc_project
    params_before = (project.root / "params.yaml").read_text()
    completed = project.run(
        sys.executable,
        str(REPOSITORY_ROOT / "benchmarks" / "course_table.py"),
        "--backbone",
        "mobilenet_v2",
        "--alpha",
        "0.35",
        "--weights",
        "none",
        *SMALL,
    )
    output = completed.stdout

    rows = [line for line in output.splitlines() if re.match(r"\| (CNN|\+|frozen)", line)]
    assert [row.split(" | ")[1] for row in rows] == list(NAMES)
    assert [row.split(" | ")[2] for row in rows] == ["68.7%", "75.2%", "87.5%"]
    assert all(re.fullmatch(r"\d+\.\d%", cell) for row in rows for cell in row.split(" | ")[3:5])
    # The augmented run changes only train_head params: upstream stages come from DVC's run cache.
    augmented = output.split("-n course-scratch-augment")[1].split("-n course-transfer")[0]
    assert "Running stage 'train_head'" in augmented and "Running stage 'evaluate'" in augmented
    assert "Running stage 'extract_features'" not in augmented and "Running stage 'download'" not in augmented
    assert (project.root / "params.yaml").read_text() == params_before  # --temp: the workspace is left alone

    experiments = shown_experiments(project)
    assert sorted(experiments) == sorted(NAMES)
    heads = {name: experiments[name]["params"]["train_head"] for name in NAMES}
    assert [heads[name]["head"] for name in NAMES] == ["scratch", "scratch", "dense"]
    assert [heads[name]["scratch"]["augment"] for name in NAMES[:2]] == [False, True]
    assert [heads[name]["scratch"]["dropout"] for name in NAMES[:2]] == [0.0, 0.2]

    evaluated = {name: experiments[name]["metrics"]["metrics/evaluate.json"] for name in NAMES}
    scratch, transfer = evaluated["course-scratch"], evaluated["course-transfer"]
    assert set(scratch) == set(transfer) == {"test", "val", "provenance"}
    for split in ("test", "val"):
        assert set(scratch[split]) == set(transfer[split]) and set(scratch[split]["per_class"]) == set(
            transfer[split]["per_class"]
        )
        assert len({evaluated[name][split]["examples"] for name in NAMES}) == 1  # the same rows in all three
    # dvc exp show leaves out empty mappings: the scratch head's provenance has no backbone blocks.
    assert set(transfer["provenance"]) - set(scratch["provenance"]) == {"blocks"}
    assert scratch["provenance"]["backbone"] == "none" and transfer["provenance"]["backbone"] == "mobilenet_v2"
    assert [evaluated[name]["provenance"]["head"] for name in NAMES] == ["scratch", "scratch", "dense"]

    trained = experiments["course-scratch"]["metrics"]["metrics/train_head.json"]
    assert trained["head"] == "scratch" and trained["trained_on"] == 18 and trained["epochs_run"] <= 2
    assert trained["train"]["examples"] == 36  # every training row is measured: originals and augment's views

    # A second run first removes these three (DVC refuses a name twice on one commit).
    script = load_script()
    script.remove_existing(list(NAMES), repo=project.root, dvc=str(Path(sys.executable).parent / "dvc"))
    assert shown_experiments(project) == {}


def test_bad_override_is_a_usage_error():
    completed = subprocess.run(
        [sys.executable, str(REPOSITORY_ROOT / "benchmarks" / "course_table.py"), "-S", "epochs"],
        capture_output=True,
        text=True,
    )
    assert completed.returncode == 2 and "expected KEY=VALUE" in completed.stderr
