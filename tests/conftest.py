"""Shared fixtures: where the ../shared mirrors are, and an isolated embedding cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TRANSFERLAB_SHARED", REPOSITORY_ROOT.parent / "shared"))
FLOWERS_ARCHIVE = SHARED / "data" / "flower_photos.tgz"
FLOWERS_ARCHIVE_SHA256 = "d34b7d1e28f0955715bfd860975c5e30131e7806d227ac6bb49f1ce40be89215"
WEIGHTS = SHARED / "weights"


@pytest.fixture(autouse=True)
def _isolated_environment(tmp_path_factory, monkeypatch):
    """Keeps every test's embedding cache and Keras home away from the user's."""
    monkeypatch.setenv("TRANSFERLAB_CACHE_DIR", str(tmp_path_factory.mktemp("embedding-cache")))
    monkeypatch.setenv("GIT_AUTHOR_NAME", "transferlab tests")
    monkeypatch.setenv("GIT_AUTHOR_EMAIL", "tests@transferlab.invalid")
    monkeypatch.setenv("GIT_COMMITTER_NAME", "transferlab tests")
    monkeypatch.setenv("GIT_COMMITTER_EMAIL", "tests@transferlab.invalid")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")


def require_mirror(path: Path) -> Path:
    """Skips the calling test, with the reason, when a ../shared mirror file is absent."""
    if not path.exists():
        pytest.skip(f"mirror not found: {path} (set TRANSFERLAB_SHARED to the shared folder)")
    return path


@pytest.fixture()
def dvc_project(tmp_path):
    """A temporary git + DVC project running this repository's pipeline on a generated dataset."""
    import support

    return support.make_project(tmp_path)
