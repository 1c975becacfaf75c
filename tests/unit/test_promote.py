"""Promote's ranking (ties broken by extraction cost) on `dvc exp show --json`-shaped data, and its refusal.

tests/pipeline/test_closing_the_loop.py promotes real experiments made with `dvc exp run`.
"""

from __future__ import annotations

import subprocess

import pytest

from transferlab import cli
from transferlab.reports import promote


def experiment(name, accuracy, speeds, loss=0.5):
    extract = {
        "stack": "+".join(speeds),
        "backbones": {member: {"engine_images_per_second": speed} for member, speed in speeds.items()},
    }
    metrics = {
        "metrics/evaluate.json": {"data": {"test": {"accuracy": accuracy, "log_loss": loss}}},
        "metrics/extract_features.json": {"data": extract},
    }
    return {"revs": [{"rev": name * 4, "name": name, "data": {"rev": name * 4, "metrics": metrics}}]}


EXP_SHOW = [
    {"rev": "workspace", "data": {}},
    {
        "rev": "1a2b3c",
        "data": {},
        "experiments": [
            experiment("slow", 0.9, {"vgg16": 5.0}, loss=0.2),
            experiment("fast", 0.9, {"mobilenet": 200.0}, loss=0.4),  # as accurate, 40x cheaper
            experiment("worse", 0.8, {"mobilenet": 200.0}),
            {"revs": [{"rev": "dead", "name": "failed", "data": {"metrics": {}}}]},  # no metrics
        ],
    },
]


def test_ranking_is_by_the_metric_then_the_cheaper_extraction():
    found = promote.candidates(EXP_SHOW, "test.accuracy")
    ranked = promote.rank(found)
    assert [candidate.name for candidate in ranked] == ["fast", "slow", "worse"]  # "failed" has no metric
    assert ranked[0].milliseconds_per_image == pytest.approx(5.0)
    assert promote.choose(ranked, found, None, "test.accuracy").name == "fast"
    lowest = promote.rank(promote.candidates(EXP_SHOW, "metrics/evaluate.json:test.log_loss"), lowest_first=True)
    assert [candidate.name for candidate in lowest] == ["slow", "fast", "worse"]
    table = promote.format_leaderboard(ranked, "test.accuracy", chosen="fast", top=2)
    assert "fast  <- promoted" in table and "(1 more)" in table


def test_a_named_experiment_or_metric_that_does_not_exist_is_refused():
    found = promote.candidates(EXP_SHOW, "test.accuracy")
    with pytest.raises(
        ValueError, match="no experiment named 'nope' for this commit; experiments: failed, fast, slow, worse"
    ):
        promote.choose(promote.rank(found), found, "nope", "test.accuracy")
    absent = promote.candidates(EXP_SHOW, "test.no_such_metric")
    with pytest.raises(ValueError, match="no experiment of this commit has the metric 'test.no_such_metric'"):
        promote.choose(promote.rank(absent), absent, None, "test.no_such_metric")


def test_it_refuses_while_params_or_the_lock_file_have_uncommitted_changes(tmp_path, monkeypatch, capsys):
    for name in ("params.yaml", "dvc.lock"):
        (tmp_path / name).write_text("base:\n  seed: 1\n")
    for arguments in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "project"]):
        subprocess.run(["git", *arguments], cwd=tmp_path, check=True, capture_output=True)
    assert promote.uncommitted(tmp_path) == []
    (tmp_path / "params.yaml").write_text("base:\n  seed: 2\n")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["promote", "--best", "test.accuracy"]) == 2
    err = capsys.readouterr().err
    assert "params.yaml has uncommitted changes that `dvc exp apply` would overwrite" in err
    assert (tmp_path / "params.yaml").read_text() == "base:\n  seed: 2\n"  # untouched
    (tmp_path / "dvc.lock").write_text("changed")
    assert cli.main(["promote", "some-experiment"]) == 2
    assert "dvc.lock and params.yaml have uncommitted changes" in capsys.readouterr().err
    assert cli.main(["promote"]) == 2
    assert "name one experiment" in capsys.readouterr().err
