"""train_head.seeds through the stage scripts and DVC: models/head's layout, and seeds.* in `dvc exp show`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_train_evaluate_stages import DVC_YAML, REPOSITORY, write_params
from test_train_evaluate_stages import workspace as workspace  # the fixture: features files, test images, params

DENSE = {"units": 16, "dropout": 0.2, "learning_rate": 0.01, "epochs": 4, "batch_size": 16, "patience": 2}


@pytest.mark.slow
def test_three_dense_seeds_under_dvc_show_mean_and_std_in_exp_show(workspace):
    def run(*command):
        completed = subprocess.run(
            command,
            cwd=workspace,
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "TRANSFERLAB_ROOT": str(workspace), "TF_CPP_MIN_LOG_LEVEL": "2"},
        )
        assert completed.returncode == 0, completed.stdout + completed.stderr
        return completed

    dvc = [sys.executable, "-m", "dvc"]
    (workspace / "dvc.yaml").write_text(DVC_YAML.format(python=sys.executable, stages=REPOSITORY / "stages"))
    write_params(workspace, {"head": "dense", "dense": DENSE, "seeds": 3})
    run("git", "init", "-q")
    run(*dvc, "init", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "workspace")
    repro = run(*dvc, "repro")
    assert "kept seed k=" in repro.stderr

    head = workspace / "models" / "head"
    record = json.loads((head / "seeds.json").read_text())
    kept = record["kept"]
    assert record["requested"] == record["trained"] == 3 and len(set(record["seeds"])) == 3
    assert sorted(path.name for path in (head / "seeds").iterdir()) == sorted(str(k) for k in {0, 1, 2} - {kept})
    assert json.loads((head / "head.json").read_text())["settings"]["seed"] == record["seeds"][kept]
    report = json.loads((workspace / "metrics" / "train_head.json").read_text())
    assert report["seeds"]["kept"] == kept and report["val"]["accuracy"] == max(report["seeds"]["val_accuracy"])

    shown = json.loads(run(*dvc, "exp", "show", "--json").stdout)
    evaluation = shown[0]["data"]["metrics"]["metrics/evaluate.json"]["data"]
    seeds = evaluation["seeds"]
    assert seeds["count"] == 3 and seeds["kept"] == kept
    for name in ("test_accuracy", "val_accuracy", "test_macro_f1", "val_macro_f1"):
        assert isinstance(seeds[f"{name}_mean"], float) and isinstance(seeds[f"{name}_std"], float)
    assert 0.0 <= seeds["ensemble"]["test_accuracy"] <= 1.0
    assert seeds["val_accuracy_mean"] <= evaluation["val"]["accuracy"]  # the kept seed is the best on validation
    table = run(*dvc, "exp", "show", "--csv").stdout.splitlines()[0]
    assert "seeds.test_accuracy_mean" in table and "seeds.ensemble.test_accuracy" in table
