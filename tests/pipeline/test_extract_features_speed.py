"""extract_features, issue 15: a fully cached run imports no TensorFlow, Keras or LiteRT; the choice is reported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from test_extract_features import stage_workspace

import support
from transferlab.features import cpu, engine_choice

pytestmark = pytest.mark.slow
HEAVY = ("tensorflow", "keras", "ai_edge_litert", "tf_keras")
# Runs the stage script in this process, then prints which heavy modules it imported.
RUNNER = """
import json, runpy, sys
sys.argv = {argv!r}
runpy.run_path(sys.argv[0], run_name="__main__")
print(json.dumps(sorted(name for name in {heavy!r} if name in sys.modules)))
"""


def run_stage_reporting_imports(root) -> list[str]:
    """Runs extract_features as dvc.yaml does, in a fresh interpreter; returns the heavy modules it imported."""
    argv = support.extract_features_command()[1:]
    code = RUNNER.format(argv=argv, heavy=HEAVY)
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_cached_runs_import_no_tensorflow_and_report_the_chosen_engine(tmp_path):
    root = stage_workspace(tmp_path, per_class=3)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["extract_features"].update(engine="auto", batch_size=4)  # converted to TFLite, checked against Keras
    (root / "params.yaml").write_text(yaml.safe_dump(params))

    assert "tensorflow" in run_stage_reporting_imports(root), "the first run converts the backbone"
    first = json.loads((root / "metrics" / "extract_features.json").read_text())
    assert run_stage_reporting_imports(root) == [], "a fully cached run needs no engine at all"
    report = json.loads((root / "metrics" / "extract_features.json").read_text())

    ((name, member),) = report["backbones"].items()
    assert first["embedded"] == 9 and report["embedded"] == 0 and report["cache_hits"] == 9
    assert member["engine"] == "tflite" and member["engine_choice"]["engine"] == "tflite"
    assert member["engine_images_per_second"] == first["backbones"][name]["engine_images_per_second"]
    assert report["cpu"] == cpu.current().as_dict() and report["cpu"]["flags"] == list(cpu.current().flags)
    choice = first["backbones"][name]["engine_choice"]
    assert choice["batch"] in engine_choice.BATCH_CANDIDATES and choice["measured_images_per_second"] > 0
    assert choice["cpu"] == cpu.current().key and member["engine_choice"] == choice, "remembered, not measured again"

    for database in (tmp_path / "cache").glob("*/*.sqlite*"):  # a new dataset: converted model cached, no rows
        database.unlink()
    imported = run_stage_reporting_imports(root)
    assert "tensorflow" not in imported and "keras" not in imported, "the converted model runs without TensorFlow"
    assert json.loads((root / "metrics" / "extract_features.json").read_text())["embedded"] == 9
