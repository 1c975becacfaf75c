"""Comparing backbones with dvc exp, metric diffs between commits, and the pull-request workflow."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPOSITORY_ROOT

WORKFLOW = REPOSITORY_ROOT / ".github" / "workflows" / "pull-request-metrics.yml"


def check_workflow(path: Path) -> subprocess.CompletedProcess:
    checker = Path(sys.executable).parent / "check-jsonschema"
    return subprocess.run(
        [str(checker), "--builtin-schema", "vendor.github-workflows", str(path)], capture_output=True, text=True
    )


def test_the_pull_request_workflow_is_a_valid_github_workflow(tmp_path):
    assert check_workflow(WORKFLOW).returncode == 0, check_workflow(WORKFLOW).stdout
    broken = tmp_path / "broken.yml"
    broken.write_text(WORKFLOW.read_text().replace("runs-on: ubuntu-latest", "runs_on: ubuntu-latest"))
    assert check_workflow(broken).returncode != 0, "the schema check must catch a misspelt key"
    text = WORKFLOW.read_text()
    assert "metrics_report.sh" in text and "upsert_comment.py" in text and "pull_request" in text
    assert "steps.gate.outputs.status != '0'" in text, "the job must fail when the gate fails"


@pytest.mark.slow
def test_metrics_diff_between_two_commits_shows_the_change_in_accuracy(dvc_project):
    project = dvc_project
    shutil.copytree(REPOSITORY_ROOT / ".github", project.root / ".github")
    project.commit("baseline")
    # A head that cannot learn (one epoch at a tiny learning rate): accuracy must fall.
    project.set_params(train_head={"head": "dense", "dense": {"epochs": 1, "learning_rate": 0.000001}})
    project.commit("worse head")
    result = project.run("bash", ".github/scripts/metrics_report.sh", "HEAD~1", "8", "report.md", check=False)
    report = (project.root / "report.md").read_text()
    # the gate fails the worse head (exit 1) and its report says which metric fell
    assert result.returncode == 1, result.stderr[-3000:]
    assert "## transferlab gate: FAILED" in report and "FAIL" in result.stderr
    accuracy_rows = [
        line for line in report.splitlines() if "test.accuracy" in line and "metrics/evaluate.json" in line
    ]
    assert accuracy_rows, result.stdout[-3000:]
    cells = [cell.strip() for cell in accuracy_rows[0].strip("|").split("|")]
    old, new = float(cells[2]), float(cells[3])
    assert new < old, accuracy_rows[0]
    assert "train_head.head" in report and "train_head.dense.learning_rate" in report


@pytest.mark.slow
def test_compare_runs_one_experiment_per_backbone_and_prints_a_leaderboard(dvc_project):
    project = dvc_project
    project.commit("baseline")
    transferlab = str(Path(sys.executable).parent / "transferlab")
    result = project.run(
        transferlab,
        "compare",
        "mobilenet_v2",
        "mobilenet",
        "-S",
        "extract_features.alpha={mobilenet_v2: 0.35, mobilenet: 0.25}",
    )
    assert "[2/2]" in result.stdout, result.stdout
    assert (
        "queued cmp-mobilenet_v2: mobilenet_v2" in result.stdout and "queued cmp-mobilenet: mobilenet" in result.stdout
    )
    leaderboard = [
        line for line in result.stdout.splitlines() if line.rstrip().endswith(("cmp-mobilenet", "cmp-mobilenet_v2"))
    ]
    assert len(leaderboard) == 2, result.stdout
    assert (project.root / "metrics" / "compare.png").stat().st_size > 0

    shown = json.loads(project.dvc("exp", "show", "--json").stdout)
    experiments = {
        revision["name"]: revision["data"]
        for baseline in shown
        for group in baseline.get("experiments") or []
        for revision in group["revs"]
    }
    assert {"cmp-mobilenet_v2", "cmp-mobilenet"} <= set(experiments)
    stacks = {
        name: data["metrics"]["metrics/extract_features.json"]["data"]["stack"] for name, data in experiments.items()
    }
    assert stacks["cmp-mobilenet_v2"] == "mobilenet_v2@0.35" and stacks["cmp-mobilenet"] == "mobilenet@0.25"
    widths = {
        name: data["metrics"]["metrics/train_head.json"]["data"]["feature_dim"] for name, data in experiments.items()
    }
    assert widths["cmp-mobilenet_v2"] == 1280 and widths["cmp-mobilenet"] == 256
    # Each leaderboard line shows its own experiment's metrics/evaluate.json, read from the experiment's commit.
    references = project.run("git", "for-each-ref", "--format=%(refname)", "refs/exps").stdout.split()
    accuracies = []
    for line in leaderboard:
        name = line.split()[-1]
        reference = next(reference for reference in references if reference.endswith(f"/{name}"))
        evaluation = json.loads(project.run("git", "show", f"{reference}:metrics/evaluate.json").stdout)
        assert evaluation["test"] == experiments[name]["metrics"]["metrics/evaluate.json"]["data"]["test"]
        shown_percentages = [cell for cell in line.split() if cell.endswith("%")]  # test acc, macro-F1, val acc
        expected = [evaluation["test"]["accuracy"], evaluation["test"]["macro_f1"], evaluation["val"]["accuracy"]]
        assert shown_percentages == [f"{100 * value:.1f}%" for value in expected], line
        assert stacks[name] in line
        accuracies.append(evaluation["test"]["accuracy"])
    assert accuracies == sorted(accuracies, reverse=True), leaderboard
