"""The package's shape: dvc.yaml deps cover every import of every stage, and imports are acyclic."""

from __future__ import annotations

import copy

import pytest
import yaml

import architecture
from conftest import REPOSITORY_ROOT

SOURCE_ROOT = REPOSITORY_ROOT / "src"


@pytest.fixture(scope="module")
def dvc_yaml():
    return yaml.safe_load((REPOSITORY_ROOT / "dvc.yaml").read_text(encoding="utf-8"))


def test_every_stage_lists_the_code_it_runs(dvc_yaml):
    assert architecture.deps_problems(dvc_yaml, REPOSITORY_ROOT, SOURCE_ROOT) == {}


def test_every_stage_script_is_found(dvc_yaml):
    scripts = {architecture.stage_script(stage["cmd"]) for stage in dvc_yaml["stages"].values()}
    assert scripts == {f"stages/{path.name}" for path in (REPOSITORY_ROOT / "stages").glob("*.py")}


def test_a_planted_omission_is_reported(dvc_yaml):
    planted = copy.deepcopy(dvc_yaml)
    planted["stages"]["train_head"]["deps"].remove("src/transferlab/heads")
    problems = architecture.deps_problems(planted, REPOSITORY_ROOT, SOURCE_ROOT)
    assert list(problems) == ["train_head"]
    assert "src/transferlab/heads/logistic.py" in problems["train_head"]  # imported only by name (registry)
    assert "src/transferlab/heads/__init__.py" in problems["train_head"]


def test_a_lazy_import_inside_a_function_counts(tmp_path):
    package = tmp_path / "src" / "transferlab"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "late.py").write_text("")
    script = tmp_path / "stages" / "s.py"
    script.parent.mkdir()
    script.write_text("def main():\n    from transferlab.sub import late\n")
    files = architecture.files_run_by(script, tmp_path / "src")
    assert package / "sub" / "late.py" in files
    assert architecture.uncovered(
        files, ["src/transferlab/__init__.py", "src/transferlab/sub/__init__.py"], tmp_path
    ) == ["src/transferlab/sub/late.py"]


def test_the_import_graph_is_acyclic():
    graph = architecture.import_graph(SOURCE_ROOT)
    assert "transferlab.features.engines" in graph  # the graph really holds the package
    assert architecture.find_cycle(graph) is None


def test_a_planted_cycle_is_found():
    graph = architecture.import_graph(SOURCE_ROOT)
    graph["transferlab.core.atomic"] = graph["transferlab.core.atomic"] | {"transferlab.data.download"}
    cycle = architecture.find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert {"transferlab.core.atomic", "transferlab.data.download"} <= set(cycle)


def test_sub_packages_import_only_downwards():
    graph = architecture.import_graph(SOURCE_ROOT)
    assert {architecture.layer_of(name) for name in graph} - {None} == set(architecture.LAYERS)
    assert architecture.layer_violations(graph) == []


def test_an_upward_import_is_reported():
    graph = architecture.import_graph(SOURCE_ROOT)
    graph["transferlab.data.split"] = graph["transferlab.data.split"] | {"transferlab.heads.base"}
    assert architecture.layer_violations(graph) == ["transferlab.data.split -> transferlab.heads.base"]
