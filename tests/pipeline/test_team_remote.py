"""A team's DVC remote on S3 (real SeaweedFS): push from one workspace, pull into a fresh clone, nothing recomputed.

This is the README's "Working as a team" recipe run for real, on photos kept in the same bucket
(``download.source: s3://bucket/photos/``, read with the AWS variables): ``dvc exp run``, commit, ``dvc remote add -d``
with the endpoint and keys only in ``.dvc/config.local`` (never in git or params.yaml), ``dvc push``; then
``git clone`` with an empty DVC cache, credentials only in the AWS variables, ``dvc pull``: ``dvc status`` and
``dvc repro`` find everything up to date (an s3:// source is not always_changed), no stage runs, the outputs are
byte for byte the pushed ones and the metrics are the same.
"""

from __future__ import annotations

import json

import pytest

import support

pytestmark = pytest.mark.slow
OUTPUTS = ("data/raw/index.csv", "data/splits/train.csv", "data/features/train.npz", "models")


def outputs(root) -> dict[str, bytes]:
    """Every file of the pipeline's DVC-tracked outputs, by path."""
    found = {}
    for name in OUTPUTS:
        path = root / name
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        found.update({str(file.relative_to(root)): file.read_bytes() for file in files if file.name != ".gitignore"})
    return found


def test_push_then_pull_into_a_fresh_clone_recomputes_nothing(tmp_path, dvc_project, s3_server, s3_bucket):
    project = dvc_project
    project.environment.update(s3_server.env())  # for the download stage; DVC's remote uses .dvc/config.local
    photos = sorted(path for path in (tmp_path / "photos").rglob("*") if path.is_file())
    keys = [f"{s3_bucket}/photos/{path.relative_to(tmp_path / 'photos').as_posix()}" for path in photos]
    s3_server.filesystem().put([str(path) for path in photos], keys)
    project.set_params(download={"source": f"s3://{s3_bucket}/photos/"})
    project.dvc("exp", "run")
    assert json.loads((project.root / "metrics" / "download.json").read_text())["source_fingerprint"]
    project.commit("results of dvc exp run")
    project.dvc("remote", "add", "-d", "storage", f"s3://{s3_bucket}/dvc-store")
    project.dvc("remote", "modify", "--local", "storage", "endpointurl", s3_server.endpoint_url)
    project.dvc("remote", "modify", "--local", "storage", "access_key_id", s3_server.access_key)
    project.dvc("remote", "modify", "--local", "storage", "secret_access_key", s3_server.secret_key)
    project.commit("the team's DVC remote")
    tracked = project.run("git", "ls-files").stdout.split()
    assert ".dvc/config" in tracked and ".dvc/config.local" not in tracked
    assert s3_server.secret_key not in (project.root / ".dvc" / "config").read_text()
    project.dvc("push")
    pushed = outputs(project.root)
    assert pushed and s3_server.filesystem().find(f"{s3_bucket}/dvc-store")

    clone = support.Project(tmp_path / "clone")
    clone.environment.update(s3_server.env())
    project.run("git", "clone", "-q", str(project.root), str(clone.root))
    assert not (clone.root / ".dvc" / "cache").exists() and outputs(clone.root) == {}
    clone.dvc("pull")

    assert outputs(clone.root) == pushed
    pulled = {path: (clone.root / path).stat().st_mtime_ns for path in outputs(clone.root)}
    assert clone.dvc("status").stdout.strip() == "Data and pipelines are up to date."
    repro = clone.dvc("repro")
    assert "Running stage" not in repro.stdout, repro.stdout
    assert {path: (clone.root / path).stat().st_mtime_ns for path in pulled} == pulled
    assert _metrics(clone) == _metrics(project)
    (workspace,) = _metrics(clone).values()
    assert workspace["data"]["metrics/evaluate.json"]["data"], "the metrics to compare are there"


def _metrics(project) -> dict:
    return json.loads(project.dvc("metrics", "show", "--json").stdout)
