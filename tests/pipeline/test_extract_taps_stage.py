"""extract_taps through DVC: a head switch reruns nothing upstream (finetune in a stack: test_finetune_pipeline)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow
UPSTREAM = ("download", "split", "augment", "extract_features")


def read_json(project, path):
    return json.loads((project.root / path).read_text())


def ran(result) -> set[str]:
    """The stages a `dvc repro` / `dvc exp run` ran (not those it skipped or restored from the run cache)."""
    return {line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage '")}


def test_switching_between_logistic_and_dense_reruns_nothing_upstream(dvc_project):
    project = dvc_project
    first = project.dvc("repro", "train_head")
    assert {*UPSTREAM, "extract_taps", "train_head"} <= ran(first)
    assert read_json(project, "metrics/extract_taps.json")["members"] == {}
    taps_index = (project.root / "data/taps/taps.json").read_bytes()
    features = read_json(project, "metrics/extract_features.json")
    project.commit("logistic")

    for head in ("dense", "logistic"):
        result = project.dvc("exp", "run", "-S", f"train_head.head={head}", "train_head")
        assert not ran(result) & set(UPSTREAM), f"switching to {head} reran {ran(result) & set(UPSTREAM)}"
        assert read_json(project, "metrics/extract_features.json") == features
        assert (project.root / "data/taps/taps.json").read_bytes() == taps_index, "the no-op writes the same bytes"
        assert read_json(project, "metrics/train_head.json")["head"] == head
    assert "extract_features" not in project.dvc("status", "train_head").stdout
