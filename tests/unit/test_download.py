"""The download stage's library: fetch, archive, index, and download (the whole stage and its report).

fetch: sources, URLs with retries and resume, checksums, local folders; archive: safe extraction;
index: the dataset root, the rows and their statuses, the class checks.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import socket
import stat
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transferlab.data import archive, download, fetch, index, tables

LIMITS = dict(max_files=1000, max_total_bytes=10**8, max_expansion_ratio=100.0)
URL_LIMITS = dict(max_bytes=10**8, deadline_seconds=30.0)  # for download_url
CHECKS = dict(min_image_side=16, max_image_pixels=10**7)


def jpeg_bytes(seed: int, size=(40, 32)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def make_dataset(folder: Path, classes=("cats", "dogs"), per_class=3, seed=0) -> Path:
    for class_index, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for image_index in range(per_class):
            (folder / name / f"{image_index}.jpg").write_bytes(jpeg_bytes(seed + 100 * class_index + image_index))
    return folder


def make_tgz(path: Path, folder: Path, arcname: str = "pets") -> Path:
    with tarfile.open(path, "w:gz") as tarball:
        tarball.add(folder, arcname=arcname)
    return path


def tar_with(path: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    with tarfile.open(path, "w") as tarball:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tarball.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def file_member(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def special_member(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, None


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------- sources


def test_resolve_source_kinds(tmp_path):
    tarball = tmp_path / "data.tgz"
    tarball.write_bytes(b"x")
    assert fetch.resolve_source("https://example.org/a.tgz") == ("url", "https://example.org/a.tgz")
    assert fetch.resolve_source(str(tarball)) == ("archive", tarball)
    assert fetch.resolve_source(str(tmp_path)) == ("folder", tmp_path)
    assert fetch.resolve_source("data.tgz", root=tmp_path) == ("archive", tmp_path / "data.tgz")
    assert fetch.resolve_source(" s3://bucket/photos/ ") == ("s3", "s3://bucket/photos/")


def test_resolve_source_errors(tmp_path):
    with pytest.raises(ValueError, match=r"missing\.tgz does not exist"):
        fetch.resolve_source("missing.tgz", root=tmp_path)
    with pytest.raises(ValueError, match=r"unsupported scheme 'ftp://'.*http\(s\)"):
        fetch.resolve_source("ftp://example.org/a.tgz")


# ---------------------------------------------------------------------------------- checksum


def test_verify_sha256(tmp_path):
    tarball = tmp_path / "a.tgz"
    tarball.write_bytes(b"archive bytes")
    got = sha256(tarball)
    assert fetch.verify_sha256(tarball, expected=got.upper(), source="a.tgz") == got
    with pytest.raises(ValueError) as mismatch:
        fetch.verify_sha256(tarball, expected="0" * 64, source="a.tgz")
    message = str(mismatch.value)
    assert "expected sha256 " + "0" * 64 in message and f"got {got}" in message
    assert f"if you trust this file, set download.sha256: {got}" in message
    with pytest.raises(ValueError, match=f"sha256 is empty.*set download.sha256: {got}"):
        fetch.verify_sha256(tarball, expected="", source="a.tgz")


# ---------------------------------------------------------------------------------- extraction


def test_extracts_tgz_and_zip(tmp_path):
    dataset = make_dataset(tmp_path / "src")
    make_tgz(tmp_path / "pets.tgz", dataset)
    with zipfile.ZipFile(tmp_path / "pets.zip", "w") as zipped:
        for file in sorted(dataset.rglob("*.jpg")):
            zipped.write(file, f"pets/{file.relative_to(dataset).as_posix()}")
    for name in ("pets.tgz", "pets.zip"):
        out = tmp_path / f"out-{name}"
        archive.extract_archive(tmp_path / name, out, **LIMITS)
        assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jpg")) == [
            "pets/cats/0.jpg",
            "pets/cats/1.jpg",
            "pets/cats/2.jpg",
            "pets/dogs/0.jpg",
            "pets/dogs/1.jpg",
            "pets/dogs/2.jpg",
        ]
        assert (out / "pets/dogs/1.jpg").read_bytes() == (dataset / "dogs/1.jpg").read_bytes()


@pytest.mark.parametrize(
    "member, expected",
    [
        (file_member("pets/../../escape.txt"), r"'pets/\.\./\.\./escape\.txt' has a '\.\.' component"),
        (file_member("/tmp/absolute.txt"), r"'/tmp/absolute\.txt' has an absolute path"),
        (
            special_member("pets/cats/link.jpg", tarfile.SYMTYPE, "/etc/passwd"),
            r"'pets/cats/link\.jpg' is a symbolic link \(to '/etc/passwd'\)",
        ),
        (
            special_member("pets/cats/hard.jpg", tarfile.LNKTYPE, "pets/cats/0.jpg"),
            r"'pets/cats/hard\.jpg' is a hard link",
        ),
        (special_member("pets/cats/tty", tarfile.CHRTYPE), r"'pets/cats/tty' is a device file or FIFO"),
        (special_member("pets/cats/pipe", tarfile.FIFOTYPE), r"'pets/cats/pipe' is a device file or FIFO"),
    ],
    ids=["traversal", "absolute", "symlink", "hardlink", "device", "fifo"],
)
def test_unsafe_tar_member_refuses_the_whole_archive(tmp_path, member, expected):
    tarball = tar_with(tmp_path / "bad.tar", file_member("pets/cats/0.jpg", jpeg_bytes(1)), member)
    out = tmp_path / "work" / "out"
    with pytest.raises(ValueError, match="refusing to extract .*bad.tar: member " + expected):
        archive.extract_archive(tarball, out, **LIMITS)
    assert list(out.rglob("*")) == []  # not even the safe member was extracted
    assert not (tmp_path / "escape.txt").exists() and not Path("/tmp/absolute.txt").exists()


@pytest.mark.parametrize(
    "name, mode, expected",
    [
        ("../escape.txt", 0o100644, r"'\.\./escape\.txt' has a '\.\.' component"),
        ("/abs.txt", 0o100644, r"'/abs\.txt' has an absolute path"),
        ("pets\\..\\..\\escape.txt", 0o100644, r"'.*escape\.txt' has a '\.\.' component"),
        ("pets/cats/link.jpg", stat.S_IFLNK | 0o777, r"'pets/cats/link\.jpg' is a symbolic link"),
    ],
    ids=["traversal", "absolute", "backslash-traversal", "symlink"],
)
def test_unsafe_zip_member_refuses_the_whole_archive(tmp_path, name, mode, expected):
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w") as zipped:
        zipped.writestr("pets/cats/0.jpg", jpeg_bytes(1))
        info = zipfile.ZipInfo(name)
        info.external_attr = mode << 16
        zipped.writestr(info, b"/etc/passwd")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="refusing to extract .*member " + expected):
        archive.extract_archive(path, out, **LIMITS)
    assert list(out.rglob("*")) == []


def test_extraction_bounds(tmp_path):
    members = [file_member(f"pets/cats/{i}.bin", bytes(1000)) for i in range(5)]
    tarball = tar_with(tmp_path / "big.tar", *members)
    with pytest.raises(ValueError, match=r"5 members, more than download.max_files=4"):
        archive.extract_archive(tarball, tmp_path / "a", max_files=4, max_total_bytes=10**6, max_expansion_ratio=100)
    with pytest.raises(ValueError, match=r"unpacks to 5000 bytes, more than download.max_total_bytes=4999"):
        archive.extract_archive(tarball, tmp_path / "b", max_files=10, max_total_bytes=4999, max_expansion_ratio=100)
    archive.extract_archive(tarball, tmp_path / "c", max_files=5, max_total_bytes=5000, max_expansion_ratio=100)
    assert len(list((tmp_path / "c").rglob("*.bin"))) == 5


def test_expansion_ratio_refuses_a_small_bomb_below_the_absolute_bound(tmp_path):
    # 4 MB of zeros packs into a few kB: about 1000 times, like the 2.9 MB -> 2 GiB archive.
    bomb = tmp_path / "bomb.tgz"
    with tarfile.open(bomb, "w:gz") as tarball:
        info = tarfile.TarInfo("pets/cats/zeros.jpg")
        info.size = 4 * 2**20
        tarball.addfile(info, io.BytesIO(bytes(info.size)))
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", compression=zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr("pets/cats/zeros.jpg", bytes(4 * 2**20))
    for name in ("bomb.tgz", "bomb.zip"):
        ratio = 4 * 2**20 / (tmp_path / name).stat().st_size
        assert ratio > 300
        out = tmp_path / f"out-{name}"
        with pytest.raises(
            ValueError,
            match=r"refusing to extract .*bytes unpack to 4194304 bytes, \d+ times as many, "
            r"more than download\.max_expansion_ratio=100 .*raise download\.max_expansion_ratio",
        ):
            archive.extract_archive(tmp_path / name, out, max_files=10, max_total_bytes=10**9, max_expansion_ratio=100)
        assert list(out.rglob("*")) == []  # far below the absolute bound, and still nothing written
        archive.extract_archive(
            tmp_path / name, out, max_files=10, max_total_bytes=10**9, max_expansion_ratio=2 * ratio
        )
        assert (out / "pets" / "cats" / "zeros.jpg").stat().st_size == 4 * 2**20


def test_photos_pass_the_expansion_ratio(tmp_path):
    tarball = make_tgz(tmp_path / "pets.tgz", make_dataset(tmp_path / "src", per_class=5))
    archive.extract_archive(tarball, tmp_path / "out", max_files=100, max_total_bytes=10**8, max_expansion_ratio=1.5)
    assert len(list((tmp_path / "out").rglob("*.jpg"))) == 10  # JPEGs barely compress (flower_photos: 1.02)


def test_not_an_archive_and_damaged_archive(tmp_path):
    (tmp_path / "notes.txt").write_text("hello\n" * 100)
    with pytest.raises(ValueError, match=r"not a supported archive; use a \.tgz, \.tar\.gz, \.tar or \.zip"):
        archive.extract_archive(tmp_path / "notes.txt", tmp_path / "a", **LIMITS)
    data = make_tgz(tmp_path / "pets.tgz", make_dataset(tmp_path / "src")).read_bytes()
    (tmp_path / "cut.tgz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot extract .*cut\.tgz"):
        archive.extract_archive(tmp_path / "cut.tgz", tmp_path / "b", **LIMITS)


# ---------------------------------------------------------------------------------- dataset root


def test_locate_dataset_root(tmp_path):
    wrapped = make_dataset(tmp_path / "one" / "outer" / "flower_photos")
    (wrapped / "LICENSE.txt").write_text("license")
    (tmp_path / "one" / ".DS_Store").write_bytes(b"x")
    (tmp_path / "one" / "__MACOSX").mkdir()
    assert index.locate_dataset_root(tmp_path / "one") == wrapped
    single = make_dataset(tmp_path / "two" / "data", classes=("only",))
    assert index.locate_dataset_root(tmp_path / "two") == single  # not into the class folder
    assert [p.name for p in index.class_folders(wrapped)] == ["cats", "dogs"]


# ---------------------------------------------------------------------------------- index


def make_messy_dataset(root: Path) -> Path:
    make_dataset(root, per_class=3)
    (root / "LICENSE.txt").write_text("not indexed")
    (root / "cats" / "deep" / "er").mkdir(parents=True)
    (root / "cats" / "deep" / "er" / "nested.jpg").write_bytes(jpeg_bytes(7))
    (root / "cats" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "cats" / ".hidden").mkdir()
    (root / "cats" / ".hidden" / "copy.jpg").write_bytes(jpeg_bytes(8))
    (root / "dogs" / "notes.txt").write_text("hello")
    (root / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8\xff" + bytes(50))
    (root / "dogs" / "tiny.jpg").write_bytes(jpeg_bytes(9, size=(8, 8)))
    (root / "dogs" / "twin.jpg").write_bytes((root / "dogs" / "0.jpg").read_bytes())
    (root / "dogs" / "conflict.jpg").write_bytes((root / "cats" / "0.jpg").read_bytes())
    return root


def test_index_rows_statuses_and_order(tmp_path):
    root = make_messy_dataset(tmp_path / "data")
    rows = list(index.index_rows(root, workers=1, **CHECKS, max_files=100))
    by_path = {row.path: row for row in rows}
    assert [row.path for row in rows] == sorted(by_path)
    assert "LICENSE.txt" not in by_path
    assert by_path["cats/deep/er/nested.jpg"].status == "ok" and by_path["cats/deep/er/nested.jpg"].label == "cats"
    assert by_path["cats/.DS_Store"].status == "not-an-image"
    assert by_path["cats/.hidden/copy.jpg"].status == "not-an-image"  # an image, but in a hidden folder
    assert by_path["dogs/notes.txt"].status == "not-an-image"
    assert by_path["dogs/broken.jpg"].status == "corrupt"
    assert (by_path["dogs/tiny.jpg"].status, by_path["dogs/tiny.jpg"].width) == ("too-small", 8)
    ok = by_path["cats/0.jpg"]
    assert (ok.label, ok.width, ok.height, ok.detail) == ("cats", 40, 32, "")
    assert ok.sha256 == sha256(root / "cats" / "0.jpg")
    assert ok.as_csv()["width"] == "40" and by_path["dogs/notes.txt"].as_csv()["width"] == ""


def test_index_is_the_same_with_worker_processes(tmp_path):
    root = make_messy_dataset(tmp_path / "data")
    assert list(index.index_rows(root, workers=2, **CHECKS, max_files=100)) == list(
        index.index_rows(root, workers=1, **CHECKS, max_files=100)
    )


def test_index_errors(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(jpeg_bytes(1))
    with pytest.raises(ValueError, match=r"no class folders found \(found: a\.jpg\).*one sub-folder per class"):
        list(index.index_rows(tmp_path / "flat", workers=1, **CHECKS, max_files=100))
    make_dataset(tmp_path / "many", per_class=3)
    with pytest.raises(ValueError, match=r"6 files .* more than download.max_files=5"):
        list(index.index_rows(tmp_path / "many", workers=1, **CHECKS, max_files=5))


def row(path: str, status: str = "ok", sha: str = "") -> tables.IndexRow:
    return tables.IndexRow(
        path, path.split("/")[0], sha or hashlib.sha256(path.encode()).hexdigest(), 40, 40, status, ""
    )


def test_check_classes():
    rows = [row(f"a/{i}.jpg") for i in range(3)] + [row(f"b/{i}.jpg") for i in range(2)]
    rows += [row("b/x.jpg", "corrupt"), row("b/y.txt", "not-an-image"), row("c/z.txt", "not-an-image")]
    with pytest.raises(ValueError) as small:
        index.check_classes(rows, min_images_per_class=3, classes=["a", "b", "c", "empty"])
    message = str(small.value)
    assert "class 'b' has 2 usable image(s) (excluded: 1 corrupt, 1 not-an-image)" in message
    assert "class 'c' has 0 usable image(s) (excluded: 1 not-an-image)" in message
    assert "class 'empty' has 0 usable image(s)" in message and "class 'a'" not in message
    assert "download.min_images_per_class=3" in message
    index.check_classes(rows[:5], min_images_per_class=2, classes=["a", "b"])
    with pytest.raises(
        ValueError, match=r"fewer than 2 classes with usable images\. Usable images per class folder: a: 3; c: 0 \("
    ):
        index.check_classes(rows[:3] + rows[-1:], min_images_per_class=2, classes=["a", "c"])


def test_summarize_duplicates_conflicts_and_exclusions():
    rows = [row("a/1.jpg", sha="s1"), row("a/2.jpg", sha="s1"), row("b/3.jpg", sha="s2"), row("a/4.jpg", sha="s2")]
    rows += [row("b/5.jpg", sha="s3"), row("b/6.jpg", "corrupt", sha="s3"), row("b/7.txt", "not-an-image")]
    metrics = download.summarize(rows, source="src", archive_sha256="abc", seconds=1.23456)
    assert metrics["images"] == 5 and metrics["classes"] == 2
    assert metrics["images_per_class"] == {"a": 3, "b": 2}
    assert metrics["excluded"] == {
        "corrupt": 1,
        "not-an-image": 1,
        "too-small": 0,
        "too-large": 0,
        "link": 0,
        "bad-name": 0,
    }
    assert [f["path"] for f in metrics["excluded_files"]] == ["b/6.jpg", "b/7.txt"]
    assert metrics["duplicate_groups"] == 2  # s3 has one ok copy only: the corrupt one does not count
    assert metrics["duplicates"] == [["a/1.jpg", "a/2.jpg"], ["a/4.jpg", "b/3.jpg"]]
    assert metrics["label_conflicts"] == [{"sha256": "s2", "labels": ["a", "b"], "paths": ["a/4.jpg", "b/3.jpg"]}]
    assert metrics["seconds"] == 1.235 and metrics["archive_sha256"] == "abc" and metrics["source"] == "src"


def test_describe_is_one_line_with_the_counts():
    rows = [row("a/1.jpg", sha="s1"), row("a/2.jpg", sha="s1"), row("b/3.jpg"), row("b/4.txt", "not-an-image")]
    metrics = download.summarize(rows, source="src", archive_sha256=None, seconds=2.04)
    assert download.describe(metrics) == (
        "3 images in 2 classes (a 2, b 1); excluded: 1 not-an-image; 1 duplicate group(s), 0 label conflict(s); 2.0 s"
    )


def test_summarize_caps_long_lists():
    rows = [row(f"a/{i}.jpg", sha=f"s{i}") for i in range(150)] + [row(f"b/{i}.jpg", sha=f"s{i}") for i in range(150)]
    metrics = download.summarize(rows, source="s", archive_sha256=None, seconds=0)
    assert metrics["duplicate_groups"] == metrics["label_conflict_groups"] == 150
    assert len(metrics["duplicates"]) == len(metrics["label_conflicts"]) == download.MAX_LISTED


# ---------------------------------------------------------------------------------- local folders


def test_folder_source_copies_and_records_links(tmp_path):
    source = make_dataset(tmp_path / "photos", per_class=5)
    (source / "cats" / "alias.jpg").symlink_to(source / "dogs" / "0.jpg")
    (source / "dogs" / "linked").symlink_to(source / "cats", target_is_directory=True)
    (source / "README.md").write_text("kept")
    destination = tmp_path / "raw" / "images"
    destination.mkdir(parents=True)
    result = download.prepare_dataset(
        source=str(source),
        sha256="",
        destination=destination,
        min_images_per_class=5,
        retries=0,
        deadline_seconds=30,
        workers=1,
        **CHECKS,
        **LIMITS,
    )
    links = {r.path: r for r in result.rows if r.status == "link"}
    assert sorted(links) == ["cats/alias.jpg", "dogs/linked"]
    assert "symbolic link to" in links["cats/alias.jpg"].detail
    assert not os.path.lexists(destination / "cats" / "alias.jpg") and not os.path.lexists(
        destination / "dogs" / "linked"
    )
    assert (destination / "README.md").read_text() == "kept"
    assert result.metrics["images"] == 10 and result.metrics["excluded"]["link"] == 2
    assert result.metrics["archive_sha256"] is None
    assert list(tmp_path.joinpath("raw").iterdir()) == [destination]  # no working files left behind


def test_archive_source_moves_the_dataset_root(tmp_path):
    dataset = make_dataset(tmp_path / "src", per_class=5)
    (dataset / "LICENSE.txt").write_text("license")
    tarball = make_tgz(tmp_path / "pets.tgz", dataset, arcname="outer/pets")
    destination = tmp_path / "raw" / "images"
    destination.mkdir(parents=True)
    result = download.prepare_dataset(
        source="pets.tgz",
        root=tmp_path,
        sha256=sha256(tarball),
        destination=destination,
        min_images_per_class=5,
        retries=0,
        deadline_seconds=30,
        workers=1,
        **CHECKS,
        **LIMITS,
    )
    assert sorted(p.name for p in destination.iterdir()) == ["LICENSE.txt", "cats", "dogs"]
    assert result.metrics["images_per_class"] == {"cats": 5, "dogs": 5}
    assert result.metrics["archive_sha256"] == sha256(tarball)
    assert all(not r.path.startswith("LICENSE") for r in result.rows)
    assert list(tmp_path.joinpath("raw").iterdir()) == [destination]


# ---------------------------------------------------------------------------------- URLs


class ArchiveServer:
    """A local HTTP server for one payload; can drop the first transfer halfway, or ignore Range."""

    def __init__(self, payload: bytes, *, drop_first: bool = False, ranges: bool = True, status: int = 200):
        self.payload, self.drop_first, self.ranges, self.status = payload, drop_first, ranges, status
        self.requests: list[dict[str, str]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                server.requests.append(dict(self.headers))
                server.respond(self)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/pets.tgz"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def respond(self, handler):
        if self.status != 200:
            handler.send_error(self.status)
            return
        start = 0
        range_header = handler.headers.get("Range")
        if self.ranges and range_header:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            handler.send_response(206)
            handler.send_header("Content-Range", f"bytes {start}-{len(self.payload) - 1}/{len(self.payload)}")
        else:
            handler.send_response(200)
        body = self.payload[start:]
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if self.drop_first and len(self.requests) == 1:
            handler.wfile.write(body[: len(body) // 2])  # then the connection closes early
            handler.close_connection = True
            return
        handler.wfile.write(body)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def payload() -> bytes:
    return np.random.default_rng(3).bytes(300_000)


def test_download_url(tmp_path, payload):
    with ArchiveServer(payload) as server:
        path = fetch.download_url(server.url, tmp_path / "a.part", **URL_LIMITS, retries=0)
    assert path.read_bytes() == payload
    assert server.requests[0].get("Accept-Encoding") == "identity"


def test_download_resumes_a_dropped_transfer_with_range(tmp_path, payload):
    waits = []
    with ArchiveServer(payload, drop_first=True) as server:
        fetch.download_url(
            server.url, tmp_path / "a.part", **URL_LIMITS, retries=2, backoff_seconds=0.25, sleep=waits.append
        )
    assert (tmp_path / "a.part").read_bytes() == payload
    assert len(server.requests) == 2 and waits == [0.25]
    assert "Range" not in server.requests[0]
    resumed_at = int(server.requests[1]["Range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= len(payload) // 2  # kept what arrived, up to the chunk in flight


def test_download_starts_over_when_the_server_ignores_range(tmp_path, payload):
    with ArchiveServer(payload, drop_first=True, ranges=False) as server:
        fetch.download_url(server.url, tmp_path / "a.part", **URL_LIMITS, retries=1, sleep=lambda s: None)
    assert (tmp_path / "a.part").read_bytes() == payload
    assert len(server.requests) == 2


def test_download_backs_off_exponentially_then_gives_up(tmp_path, payload):
    waits = []
    with ArchiveServer(payload, status=503) as server:
        with pytest.raises(ValueError, match=r"could not download .* after 4 attempt\(s\): HTTP 503.*download.retries"):
            fetch.download_url(
                server.url, tmp_path / "a.part", **URL_LIMITS, retries=3, backoff_seconds=1.0, sleep=waits.append
            )
    assert waits == [1.0, 2.0, 4.0] and len(server.requests) == 4


def test_download_does_not_retry_a_missing_file(tmp_path, payload):
    with ArchiveServer(payload, status=404) as server:
        with pytest.raises(ValueError, match=r"HTTP 404.*Check download.source"):
            fetch.download_url(server.url, tmp_path / "a.part", **URL_LIMITS, retries=3, sleep=lambda s: None)
    assert len(server.requests) == 1


def test_download_unreachable_host(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ValueError, match=r"could not download .* after 2 attempt\(s\)"):
        fetch.download_url(
            f"http://127.0.0.1:{port}/a.tgz", tmp_path / "a.part", **URL_LIMITS, retries=1, sleep=lambda s: None
        )


def test_prepare_dataset_from_url_verifies_then_extracts(tmp_path):
    tarball = make_tgz(tmp_path / "pets.tgz", make_dataset(tmp_path / "src", per_class=5))
    destination = tmp_path / "raw" / "images"
    destination.mkdir(parents=True)
    settings = dict(
        destination=destination,
        min_images_per_class=5,
        retries=1,
        deadline_seconds=30,
        workers=1,
        backoff_seconds=0,
        **CHECKS,
        **LIMITS,
    )
    with ArchiveServer(tarball.read_bytes(), drop_first=True) as server:
        result = download.prepare_dataset(source=server.url, sha256=sha256(tarball), **settings)
        assert result.metrics["images"] == 10 and result.metrics["source"] == server.url
        with pytest.raises(ValueError, match="checksum mismatch"):
            download.prepare_dataset(source=server.url, sha256="1" * 64, **settings)
    assert list(tmp_path.joinpath("raw").iterdir()) == [destination]  # the downloaded file is gone


def test_folder_source_bounds(tmp_path):
    source = make_dataset(tmp_path / "photos", per_class=3)
    destination = tmp_path / "raw" / "images"
    destination.mkdir(parents=True)
    with pytest.raises(
        ValueError, match=r"refusing to copy .*photos: it has 5 members, more than download.max_files=4"
    ):
        fetch.copy_folder(source, destination, max_files=4, max_total_bytes=10**8)
