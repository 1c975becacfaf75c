"""download.source on S3 (s3://bucket/prefix/ and s3://bucket/archive.tgz) against a real SeaweedFS server.

The stage runs as DVC runs it (tests/pipeline/test_download_stage.py's Workspace), with the server's
credentials in the standard AWS variables only. An s3:// prefix must index exactly what the same folder on disk
indexes; every failure must be one clear line that leaves data/raw as it was.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import s3_server as s3
from test_download_stage import Workspace, make_flowers, make_tgz, sha256

from transferlab.data import fetch

pytestmark = pytest.mark.slow
LIMITS = dict(max_files=1000, max_total_bytes=10**8)


@pytest.fixture()
def aws(s3_server, monkeypatch):
    """The server's credentials and endpoint in the environment the stage subprocesses inherit."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


def upload(server, folder: Path, target: str) -> None:
    """Uploads every file under ``folder`` (hidden ones included) to ``target`` (bucket/prefix)."""
    fs = server.filesystem()
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    fs.put([str(path) for path in files], [f"{target}/{path.relative_to(folder).as_posix()}" for path in files])


def tree(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def without(metrics: dict, *keys: str) -> dict:
    return {key: value for key, value in metrics.items() if key not in keys}


def test_an_s3_prefix_indexes_the_same_images_as_the_folder_on_disk(tmp_path, aws, s3_bucket):
    flowers = make_flowers(tmp_path / "flowers")
    (flowers / "roses" / "photo n°1 été 花.jpg").write_bytes((flowers / "roses" / "plain.jpg").read_bytes()[::-1])
    upload(aws, flowers, f"{s3_bucket}/team/flowers")
    on_disk, on_s3 = Workspace(tmp_path / "disk"), Workspace(tmp_path / "s3")

    assert on_disk.run(source=str(flowers)).returncode == 0
    result = on_s3.run(source=f"s3://{s3_bucket}/team/flowers/")

    assert result.returncode == 0, result.stderr
    assert on_s3.rows() == on_disk.rows()
    assert tree(on_s3.images) == tree(on_disk.images)
    ignored = ("source", "seconds", "source_fingerprint")
    assert without(on_s3.metrics(), *ignored) == without(on_disk.metrics(), *ignored)
    assert re.fullmatch(r"[0-9a-f]{64}", on_s3.metrics()["source_fingerprint"])
    assert on_disk.metrics()["source_fingerprint"] is None
    assert on_s3.leftovers() == []


def test_an_s3_archive_is_checked_with_its_sha256(tmp_path, aws, s3_bucket):
    flowers = make_flowers(tmp_path / "flowers")
    archive = make_tgz(tmp_path / "flowers.tgz", flowers, arcname="flower_photos")
    aws.filesystem().put_file(str(archive), f"{s3_bucket}/archives/flowers.tgz")
    from_file, from_s3 = Workspace(tmp_path / "file"), Workspace(tmp_path / "s3")

    assert from_file.run(source=str(archive), sha256=sha256(archive)).returncode == 0
    result = from_s3.run(source=f"s3://{s3_bucket}/archives/flowers.tgz", sha256=sha256(archive))

    assert result.returncode == 0, result.stderr
    assert from_s3.rows() == from_file.rows()
    assert from_s3.metrics()["archive_sha256"] == sha256(archive)
    assert from_s3.metrics()["source_fingerprint"] is None  # the sha256 pins an archive

    before = tree(from_s3.root / "data")
    wrong = from_s3.run(source=f"s3://{s3_bucket}/archives/flowers.tgz", sha256="0" * 64)
    assert wrong.returncode == 1 and "checksum mismatch" in wrong.stderr
    assert tree(from_s3.root / "data") == before


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        pytest.param(
            "wrong-secret", r"refused access .*AWS_SECRET_ACCESS_KEY.*never go in params\.yaml", id="wrong-secret"
        ),
        pytest.param("no-credentials", r"no S3 credentials found; set AWS_ACCESS_KEY_ID", id="no-credentials"),
        pytest.param(
            "missing-bucket",
            r"bucket 'no-such-bucket-[0-9a-f]+' does not exist at http://127\.0\.0\.1:\d+",
            id="missing-bucket",
        ),
        pytest.param(
            "missing-prefix", r"no such object or prefix in bucket '.*'\. Upload the dataset there", id="missing-prefix"
        ),
    ],
)
def test_s3_failures_are_one_clear_line_and_leave_data_raw_as_it_was(
    tmp_path, aws, s3_bucket, monkeypatch, case, expected
):
    flowers = make_flowers(tmp_path / "flowers")
    upload(aws, flowers, f"{s3_bucket}/flowers")
    workspace = Workspace(tmp_path / "repo")
    for path, text in {
        "data/raw/images/roses/old.jpg": "old",
        "data/raw/index.csv": "old",
        "metrics/download.json": "{}",
    }.items():
        (workspace.root / path).parent.mkdir(parents=True, exist_ok=True)
        (workspace.root / path).write_text(text)  # what an earlier run left
    before = tree(workspace.root / "data"), (workspace.root / "metrics" / "download.json").read_bytes()
    source = f"s3://{s3_bucket}/flowers/"
    if case == "wrong-secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    elif case == "no-credentials":
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.aws either
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    elif case == "missing-bucket":
        source = f"s3://no-such-bucket-{s3_bucket.rsplit('-', 1)[1]}/flowers/"
    else:
        source = f"s3://{s3_bucket}/flowerz/"

    result = workspace.run(source=source)

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    message = result.stderr.split("download: error: ", 1)[1].strip()
    assert "\n" not in message and re.search(expected, message), message
    assert (tree(workspace.root / "data"), (workspace.root / "metrics" / "download.json").read_bytes()) == before
    assert workspace.leftovers() == []


def test_the_fingerprint_follows_the_objects(tmp_path, aws, s3_bucket):
    fs = aws.filesystem()
    fs.pipe({f"{s3_bucket}/p/cats/a.jpg": b"aaaa", f"{s3_bucket}/p/dogs/b.jpg": b"bbbb"})

    def fingerprint(name: str) -> str:
        work = tmp_path / name
        work.mkdir()
        return fetch.fetch_s3(f"s3://{s3_bucket}/p", work, **LIMITS).fingerprint

    first, again = fingerprint("first"), fingerprint("again")
    fs.pipe(f"{s3_bucket}/p/cats/a.jpg", b"AAAA")  # same size, new bytes: a new ETag
    rewritten = fingerprint("rewritten")
    fs.pipe(f"{s3_bucket}/p/dogs/c.jpg", b"c")
    added = fingerprint("added")

    assert first == again
    assert len({first, rewritten, added}) == 3
    assert (tmp_path / "rewritten" / "s3" / "cats" / "a.jpg").read_bytes() == b"AAAA"


def test_a_prefix_over_the_bounds_is_refused_before_anything_is_downloaded(tmp_path, aws, s3_bucket):
    aws.filesystem().pipe({f"{s3_bucket}/p/cats/{index}.jpg": b"x" * 10 for index in range(3)})

    with pytest.raises(ValueError, match=r"3 members, more than download\.max_files=2"):
        fetch.fetch_s3(f"s3://{s3_bucket}/p/", tmp_path, max_files=2, max_total_bytes=10**6)
    with pytest.raises(ValueError, match=r"30 bytes, more than download\.max_total_bytes=29"):
        fetch.fetch_s3(f"s3://{s3_bucket}/p/", tmp_path, max_files=10, max_total_bytes=29)
    with pytest.raises(ValueError, match=r"the object has 10 bytes, more than download\.max_total_bytes=9"):
        fetch.fetch_s3(f"s3://{s3_bucket}/p/cats/0.jpg", tmp_path, max_files=10, max_total_bytes=9)
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_endpoint_is_one_clear_line(tmp_path, aws, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{s3.free_ports(1)[0]}")  # nothing listens there

    with pytest.raises(
        ValueError, match=r"S3 request to http://127\.0\.0\.1:\d+ failed .*server is reachable"
    ) as error:
        fetch.fetch_s3("s3://photos/flowers/", tmp_path, **LIMITS)
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []
