"""Closing the loop on a real DVC project: gate, error diff, promote, label issues, and compare's queue.

One temporary project (random-init MobileNetV2 at 32 px, tests/support.py) serves every test of
this module, to keep CI fast: it is run once (`dvc repro`, committed as the baseline), then two
real experiments are made with `dvc exp run`: ``worse`` (a dense head that cannot learn: one
epoch at a tiny learning rate) and ``better`` (the logistic head, another max_iter). Each test
starts from the committed workspace (:meth:`support.Project.restore`).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import yaml

import support

pytestmark = pytest.mark.slow
TRANSFERLAB = str(Path(sys.executable).parent / "transferlab")
IDENTITY = {
    "GIT_AUTHOR_NAME": "transferlab tests",
    "GIT_AUTHOR_EMAIL": "tests@transferlab.invalid",
    "GIT_COMMITTER_NAME": "transferlab tests",
    "GIT_COMMITTER_EMAIL": "tests@transferlab.invalid",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    project = support.make_project(tmp_path_factory.mktemp("loop"))
    project.environment.update(IDENTITY)  # module-scoped: set up before the per-test environment fixture
    project.dvc("repro")
    project.commit("baseline run")
    worse_head = ["train_head.head=dense", "train_head.dense.epochs=1", "train_head.dense.learning_rate=0.000001"]
    project.dvc("exp", "run", "-n", "worse", *[part for item in worse_head for part in ("-S", item)])
    project.restore()  # `dvc exp run` leaves the experiment in the workspace: start the next one from HEAD
    project.dvc("exp", "run", "-n", "better", "-S", "train_head.logistic.max_iter=500")
    return project


def accuracy(project: support.Project) -> float:
    return json.loads((project.root / "metrics" / "evaluate.json").read_text())["test"]["accuracy"]


def error_kinds(project: support.Project) -> dict[str, int]:
    with (project.root / "gate" / "error_diff.csv").open() as handle:
        kinds = [row["kind"] for row in csv.DictReader(handle)]
    return {kind: kinds.count(kind) for kind in ("fixed", "newly_wrong", "wrong_in_both")}


def test_the_gate_passes_on_an_unchanged_workspace(loop):
    loop.restore()
    result = loop.run(TRANSFERLAB, "gate", "--baseline", "HEAD", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    report = (loop.root / "gate" / "report.md").read_text()
    value = f"{accuracy(loop):.4f}"
    assert "## transferlab gate: passed" in report
    assert f"| `test.accuracy` | {value} | {value} | 0 |" in report  # shown although unchanged
    assert "0 fixed, 0 newly wrong" in report
    params_section = report.split("### `dvc params diff`")[1].split("###")[0]
    assert "No changes." in params_section


def test_the_gate_fails_on_a_worse_head_and_shows_the_errors_it_introduced(loop):
    loop.restore()
    before = accuracy(loop)
    loop.dvc("exp", "apply", "worse")
    assert accuracy(loop) < before
    result = loop.run(TRANSFERLAB, "gate", "--baseline", "HEAD", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL test.macro_f1: baseline" in result.stderr
    report = (loop.root / "gate" / "report.md").read_text()
    assert "## transferlab gate: FAILED" in report and "train_head.head" in report  # dvc params diff
    model_figures = report.split("### `dvc metrics diff` (model figures)")[1].split("###")[0]
    assert "| metrics/evaluate.json | test.accuracy |" in model_figures
    assert error_kinds(loop)["newly_wrong"] >= 1 and (loop.root / "gate" / "error_diff.png").stat().st_size > 0

    # The other way round, with an experiment as the baseline: the committed head fixes those images.
    loop.restore()
    result = loop.run(TRANSFERLAB, "gate", "--baseline", "worse", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "against experiment worse" in result.stdout and error_kinds(loop)["fixed"] >= 1


def test_promote_refuses_while_params_have_uncommitted_changes(loop):
    loop.restore()
    loop.set_params(train_head={"logistic": {"max_iter": 123}})
    result = loop.run(TRANSFERLAB, "promote", "--best", "test.accuracy", check=False)
    assert result.returncode == 2
    assert "params.yaml has uncommitted changes that `dvc exp apply` would overwrite" in result.stderr
    assert yaml.safe_load((loop.root / "params.yaml").read_text())["train_head"]["logistic"]["max_iter"] == 123


def test_promote_best_applies_the_better_experiment_and_branches_it(loop):
    loop.restore()
    result = loop.run(TRANSFERLAB, "promote", "--best", "test.accuracy", "--branch", "promoted", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "promoting better (test.accuracy" in result.stdout
    assert "train_head.logistic.max_iter" in result.stdout  # the params diff it brings
    params = yaml.safe_load((loop.root / "params.yaml").read_text())
    assert params["train_head"]["head"] == "logistic" and params["train_head"]["logistic"]["max_iter"] == 500
    assert "promoted" in loop.run("git", "branch", "--list", "promoted").stdout


def test_label_issues_writes_the_csv_and_the_gallery(loop):
    loop.restore()
    result = loop.run(TRANSFERLAB, "label-issues", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    with (loop.root / "metrics" / "label_issues.csv").open() as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["rank", "path", "split", "sha256", "given_label", "suggested_label", "score"]
        rows = list(reader)
    assert all((loop.root / "data" / "raw" / "images" / row["path"]).is_file() for row in rows)
    assert (loop.root / "metrics" / "label_issues.png").stat().st_size > 0
    assert "suspected label errors among" in result.stdout


def test_compare_embeds_first_then_queues_and_keeps_a_failed_experiments_log(loop):
    loop.restore()
    result = loop.run(
        TRANSFERLAB, "compare", "mobilenet", "nosuchnet", "--prefix", "q",
        "-S", "extract_features.alpha={mobilenet: 0.25}",
        check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr  # one experiment failed
    lines = result.stdout.splitlines()
    prefetched = next(line for line in lines if line.startswith("prefetch mobilenet:"))
    assert int(prefetched.split(": ")[1].split()[0]) > 0, prefetched  # embedded here, before the queue
    assert any(line.startswith("prefetch nosuchnet: failed") for line in lines), result.stdout
    failed_row = next(line for line in lines if line.rstrip().endswith("q-nosuchnet"))
    assert "FAILED, log: logs/compare/q-nosuchnet.log" in failed_row
    assert "nosuchnet" in (loop.root / "logs" / "compare" / "q-nosuchnet.log").read_text()
    # The queued experiment found every embedding in the cache: it embedded nothing.
    reference = next(
        ref
        for ref in loop.run("git", "for-each-ref", "--format=%(refname)", "refs/exps").stdout.split()
        if ref.endswith("/q-mobilenet")
    )
    extracted = json.loads(loop.run("git", "show", f"{reference}:metrics/extract_features.json").stdout)
    assert extracted["embedded"] == 0 and extracted["cache_hits"] > 0
