"""`transferlab gate`: exit codes 0/1/2, thresholds from params.yaml and flags, the report, baselines.

Each test builds a small git repository holding committed metrics (as a pipeline run leaves them)
and then changes the workspace's copy, so the gate's arithmetic is checked on known numbers
without running the pipeline (tests/pipeline/test_closing_the_loop.py runs it for real).
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPOSITORY_ROOT
from transferlab import cli
from transferlab.reports import baseline as baseline_module
from transferlab.reports import gate

CLASSES = ("daisy", "roses", "tulips")


def evaluation(accuracy=0.9, macro_f1=0.9, f1=(0.9, 0.9, 0.9)) -> dict:
    per_class = {
        name: {"precision": value, "recall": value, "f1": value, "support": 10} for name, value in zip(CLASSES, f1)
    }
    return {
        "test": {"examples": 30, "accuracy": accuracy, "balanced_accuracy": accuracy, "macro_f1": macro_f1,
                 "top2_accuracy": 1.0, "log_loss": 0.3, "per_class": per_class},
        "val": {"examples": 30, "accuracy": 0.88, "macro_f1": 0.87},
        "provenance": {"backbone": "mobilenet_v2@0.35", "head": "logistic"},
    }  # fmt: skip


def export_report(agreement=1.0) -> dict:
    return {"formats": {"keras": {"agreement": agreement, "kept": agreement >= 0.99, "latency_ms": 12.5}}}


def git(root: Path, *arguments: str) -> str:
    return subprocess.run(["git", *arguments], cwd=root, check=True, capture_output=True, text=True).stdout


def write_metrics(root: Path, evaluate: dict | None = None, export: dict | None = None) -> None:
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics" / "evaluate.json").write_text(json.dumps(evaluate or evaluation()))
    (root / "metrics" / "export.json").write_text(json.dumps(export or export_report()))


@pytest.fixture()
def repository(tmp_path, monkeypatch):
    """A git repository whose HEAD holds params.yaml and a run's metrics; the cwd for the command."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPOSITORY_ROOT / "params.yaml", root / "params.yaml")
    write_metrics(root)
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "baseline")
    monkeypatch.chdir(root)
    return root


def run_gate(*arguments: str) -> int:
    return cli.main(["gate", "--no-dvc", *arguments])


def test_the_same_metrics_pass_and_the_report_shows_the_gated_metrics(repository, capsys):
    assert run_gate("--baseline", "HEAD") == 0
    out = capsys.readouterr().out
    assert "pass test.accuracy: baseline 0.9000, new 0.9000" in out and "gate passed" in out
    report = (repository / "gate" / "report.md").read_text()
    assert "## transferlab gate: passed" in report
    # unchanged metrics are still shown: dvc metrics diff would omit them
    assert "| `test.accuracy` | 0.9000 | 0.9000 | 0 |" in report
    assert "| `test.macro_f1` | 0.9000 | 0.9000 | 0 |" in report
    assert "Machine-dependent figures" in report


def test_a_drop_past_a_threshold_fails_naming_metric_values_and_threshold(repository, capsys):
    write_metrics(repository, evaluation(accuracy=0.85, macro_f1=0.85, f1=(0.9, 0.75, 0.9)))
    assert run_gate("--baseline", "HEAD") == 1
    err = capsys.readouterr().err
    assert "FAIL test.macro_f1: baseline 0.9000, new 0.8500, threshold drop <= 0.0100 (gate.max_macro_f1_drop)" in err
    assert "FAIL test.per_class.roses.f1: baseline 0.9000, new 0.7500, threshold drop <= 0.0500" in err
    report = (repository / "gate" / "report.md").read_text()
    assert "## transferlab gate: FAILED" in report and "`test.macro_f1`" in report
    assert "| `test.accuracy` | 0.9000 | 0.8500 | -0.0500 |" in report


def test_a_missing_metrics_file_is_a_usage_error(repository, capsys):
    (repository / "metrics" / "evaluate.json").unlink()
    assert run_gate("--baseline", "HEAD") == 2
    assert "metrics/evaluate.json not found in the workspace" in capsys.readouterr().err


def test_a_baseline_without_metrics_or_an_unknown_one_is_a_usage_error(repository, capsys):
    (repository / "README").write_text("first")
    git(repository, "rm", "-q", "-r", "metrics")
    git(repository, "add", "README")
    git(repository, "commit", "-qm", "no metrics")
    git(repository, "checkout", "-q", "HEAD~1", "--", "metrics")
    assert run_gate("--baseline", "HEAD") == 2
    assert "metrics/evaluate.json is not in HEAD" in capsys.readouterr().err
    assert run_gate("--baseline", "no-such-thing") == 2
    assert "neither a git revision nor a DVC experiment" in capsys.readouterr().err


def test_thresholds_come_from_params_yaml_and_a_flag_overrides_them(repository, capsys):
    write_metrics(repository, evaluation(accuracy=0.87, macro_f1=0.87, f1=(0.87, 0.87, 0.87)))
    assert run_gate("--baseline", "HEAD") == 1  # the repository's params: macro-F1 may fall by 0.01
    params = yaml.safe_load((repository / "params.yaml").read_text())
    params["gate"]["max_macro_f1_drop"] = 0.05
    (repository / "params.yaml").write_text(yaml.safe_dump(params))
    capsys.readouterr()
    assert run_gate("--baseline", "HEAD") == 0
    assert "threshold drop <= 0.0500 (gate.max_macro_f1_drop)" in capsys.readouterr().out
    assert run_gate("--baseline", "HEAD", "--max-macro-f1-drop", "0.02") == 1
    assert "threshold drop <= 0.0200" in capsys.readouterr().err
    assert run_gate("--baseline", "HEAD", "--min-test-accuracy", "0.9") == 1
    assert "FAIL test.accuracy: baseline 0.9000, new 0.8700, threshold >= 0.9000" in capsys.readouterr().err
    assert run_gate("--baseline", "HEAD", "--min-test-accuracy", "1.5") == 2  # out of range: a usage error
    params["gate"]["max_macro_f1_drop"] = -1
    (repository / "params.yaml").write_text(yaml.safe_dump(params))
    assert run_gate("--baseline", "HEAD") == 2
    assert "gate.max_macro_f1_drop" in capsys.readouterr().err


def test_the_export_agreement_is_gated_unless_switched_off(repository, capsys):
    write_metrics(repository, export=export_report(agreement=0.95))
    assert run_gate("--baseline", "HEAD") == 1
    assert "FAIL formats.keras.agreement: baseline 1.0000, new 0.9500, threshold >= 0.9900" in capsys.readouterr().err
    assert run_gate("--baseline", "HEAD", "--min-export-agreement", "0") == 0
    (repository / "metrics" / "export.json").unlink()
    assert run_gate("--baseline", "HEAD") == 2
    assert "--min-export-agreement 0" in capsys.readouterr().err


def test_an_experiment_name_resolves_to_its_commit(repository):
    write_metrics(repository, evaluation(accuracy=0.5, macro_f1=0.5, f1=(0.5, 0.5, 0.5)))
    git(repository, "commit", "-qam", "an experiment's commit")
    experiment = git(repository, "rev-parse", "HEAD").strip()
    head = git(repository, "rev-parse", "HEAD~1").strip()
    git(repository, "update-ref", f"refs/exps/{head[:2]}/{head[2:]}/cmp-worse", experiment)
    git(repository, "reset", "-q", "--hard", "HEAD~1")
    resolved = baseline_module.resolve("cmp-worse")
    assert (resolved.kind, resolved.commit) == ("experiment", experiment)
    assert resolved.label == f"experiment cmp-worse ({experiment[:8]})"
    assert json.loads(baseline_module.read_text(resolved, "metrics/evaluate.json"))["test"]["accuracy"] == 0.5
    assert baseline_module.read_text(resolved, "metrics/absent.json") is None
    assert run_gate("--baseline", "cmp-worse") == 0  # the workspace is better than that experiment


def test_class_checks_fail_when_a_class_disappears():
    old, new = evaluation(), copy.deepcopy(evaluation())
    del new["test"]["per_class"]["tulips"]
    checks = gate.run_checks(new=new, baseline=old, thresholds=gate.Thresholds(), new_export=export_report())
    failed = [check for check in checks if not check.passed]
    assert [check.parameter for check in failed] == ["gate.max_class_f1_drop"]
    assert "tulips" in failed[0].message()


def test_machine_dependent_figures_are_kept_apart():
    diff = {
        "metrics/evaluate.json": {"test.accuracy": {"old": 0.9, "new": 0.8, "diff": -0.1}},
        "metrics/extract_features.json": {
            "seconds": {"old": 3.0, "new": 4.0, "diff": 1.0},
            "backbones.mobilenet_v2.engine_images_per_second": {"old": 100.0, "new": 90.0, "diff": -10.0},
            "cache_hits": {"old": 0, "new": 60, "diff": 60},
        },
        "metrics/export.json": {"formats.keras.latency_ms": {"old": 9.0, "new": 11.0, "diff": 2.0}},
    }
    model, machine = gate.split_metrics_diff(diff)
    assert [row[1] for row in model] == ["test.accuracy"]
    assert {row[1] for row in machine} == {
        "seconds",
        "backbones.mobilenet_v2.engine_images_per_second",
        "cache_hits",
        "formats.keras.latency_ms",
    }
