"""stages/download.py end to end: real processes, real archives, every bad input, the real data."""

from __future__ import annotations

import csv
import hashlib
import http.server
import io
import json
import re
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import FLOWERS_ARCHIVE, FLOWERS_ARCHIVE_SHA256, REPOSITORY_ROOT, require_mirror

STAGE = REPOSITORY_ROOT / "stages" / "download.py"
INDEX_HEADER = ["path", "label", "sha256", "width", "height", "status", "detail"]


def noise(size=(48, 40), seed=0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def save(image: Image.Image, path: Path, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)


def make_flowers(root: Path) -> Path:
    """Two classes of 8 usable images in every awkward mode and format, plus 6 bad files."""
    roses, tulips = root / "roses", root / "tulips"
    save(noise(seed=1), roses / "plain.jpg")
    save(noise(seed=2).convert("L"), roses / "gray.jpg")
    save(noise(seed=3).convert("CMYK"), roses / "cmyk.jpg")
    save(noise(seed=4).convert("RGBA"), roses / "alpha.png")
    save(Image.fromarray(np.full((40, 48), 40000, dtype=np.uint16)), roses / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    save(noise((60, 40), seed=5), roses / "rotated.jpg", exif=exif.tobytes())
    save(noise(seed=6), roses / "nested" / "photo.webp")
    save(noise(seed=7).convert("P"), roses / "palette.gif")
    for index in range(7):
        save(noise(seed=10 + index), tulips / f"t{index}.jpg")
    save(noise(seed=20), tulips / "bitmap.bmp")
    (tulips / "noise.jpg").write_bytes(np.random.default_rng(9).bytes(4000))
    truncated = io.BytesIO()
    noise((200, 150), seed=21).save(truncated, format="JPEG")
    (tulips / "truncated.jpg").write_bytes(truncated.getvalue()[:3000])
    (tulips / "notes.txt").write_text("not a photo\n")
    (tulips / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    save(noise((10, 10), seed=22), tulips / "tiny.png")
    save(Image.new("1", (800, 800)), tulips / "bomb.png")  # 640000 pixels > max_image_pixels below
    (root / "LICENSE.txt").write_text("photos under CC-BY\n")
    return root


def make_tgz(path: Path, folder: Path, arcname: str) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        archive.add(folder, arcname=arcname)
    return path


def tar_with(path: Path, good_folder: Path, name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> Path:
    with tarfile.open(path, "w:gz") as archive:
        archive.add(good_folder, arcname="flowers")
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, linkname
        archive.addfile(info, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Workspace:
    """A repository-like folder with a params.yaml, where the stage runs as DVC would run it."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        (root / "dvc.yaml").write_text("stages: {}\n")

    def start(self, **download) -> subprocess.Popen:
        settings = {
            "min_image_side": 16,
            "min_images_per_class": 5,
            "max_image_pixels": 500_000,
            "retries": 0,
            **download,
        }
        (self.root / "params.yaml").write_text(yaml.safe_dump({"base": {"seed": 1}, "download": settings}))
        command = [
            sys.executable,
            str(STAGE),
            "--images",
            "data/raw/images",
            "--index",
            "data/raw/index.csv",
            "--metrics",
            "metrics/download.json",
        ]
        return subprocess.Popen(command, cwd=self.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def run(self, **download) -> subprocess.CompletedProcess:
        with self.start(**download) as process:
            stdout, stderr = process.communicate(timeout=300)
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

    @property
    def images(self) -> Path:
        return self.root / "data" / "raw" / "images"

    @property
    def index(self) -> Path:
        return self.root / "data" / "raw" / "index.csv"

    def rows(self) -> list[dict[str, str]]:
        with self.index.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            assert reader.fieldnames == INDEX_HEADER
            return list(reader)

    def metrics(self) -> dict:
        return json.loads((self.root / "metrics" / "download.json").read_text())

    def leftovers(self) -> list[str]:
        raw = self.root / "data" / "raw"
        return sorted(p.name for p in raw.iterdir() if p.name not in ("images", "index.csv")) if raw.exists() else []


@pytest.fixture()
def flowers(tmp_path) -> Path:
    return make_flowers(tmp_path / "flowers")


@pytest.fixture()
def workspace(tmp_path) -> Workspace:
    return Workspace(tmp_path / "repo")


def test_stage_indexes_an_archive(tmp_path, flowers, workspace):
    archive = make_tgz(tmp_path / "flowers.tgz", flowers, arcname="flower_photos")
    result = workspace.run(source=str(archive), sha256=sha256(archive))
    assert result.returncode == 0, result.stderr
    rows = workspace.rows()
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    status = {r["path"]: r["status"] for r in rows}
    assert status == {
        "roses/alpha.png": "ok",
        "roses/cmyk.jpg": "ok",
        "roses/deep.png": "ok",
        "roses/gray.jpg": "ok",
        "roses/nested/photo.webp": "ok",
        "roses/palette.gif": "ok",
        "roses/plain.jpg": "ok",
        "roses/rotated.jpg": "ok",
        "tulips/.DS_Store": "not-an-image",
        "tulips/bitmap.bmp": "ok",
        "tulips/bomb.png": "too-large",
        "tulips/noise.jpg": "corrupt",
        "tulips/notes.txt": "not-an-image",
        "tulips/tiny.png": "too-small",
        "tulips/truncated.jpg": "corrupt",
        **{f"tulips/t{i}.jpg": "ok" for i in range(7)},
    }
    rotated = next(r for r in rows if r["path"] == "roses/rotated.jpg")
    assert (rotated["label"], rotated["width"], rotated["height"]) == ("roses", "40", "60")
    assert rotated["sha256"] == sha256(flowers / "roses" / "rotated.jpg")
    assert all(r["detail"] for r in rows if r["status"] != "ok")
    assert sorted(p.name for p in workspace.images.iterdir()) == ["LICENSE.txt", "roses", "tulips"]
    assert (workspace.images / "roses" / "nested" / "photo.webp").read_bytes() == (
        flowers / "roses/nested/photo.webp"
    ).read_bytes()
    metrics = workspace.metrics()
    assert metrics["images"] == 16 and metrics["classes"] == 2
    assert metrics["images_per_class"] == {"roses": 8, "tulips": 8}
    assert metrics["excluded"] == {
        "corrupt": 2,
        "not-an-image": 2,
        "too-small": 1,
        "too-large": 1,
        "link": 0,
        "bad-name": 0,
    }
    assert {f["path"] for f in metrics["excluded_files"]} == {p for p, s in status.items() if s != "ok"}
    assert metrics["archive_sha256"] == sha256(archive) and metrics["source"] == str(archive)
    assert metrics["duplicate_groups"] == 0 and metrics["label_conflicts"] == []
    assert workspace.leftovers() == []


def test_stage_from_a_folder_with_a_relative_path_and_a_link(tmp_path, flowers, workspace):
    dataset = workspace.root / "photos"
    flowers.rename(dataset)
    (dataset / "tulips" / "alias.jpg").symlink_to(dataset / "roses" / "plain.jpg")
    (dataset / "roses" / "twin.jpg").write_bytes((dataset / "roses" / "plain.jpg").read_bytes())
    (dataset / "tulips" / "conflict.jpg").write_bytes((dataset / "roses" / "gray.jpg").read_bytes())
    result = workspace.run(source="photos", sha256="")
    assert result.returncode == 0, result.stderr
    link = next(r for r in workspace.rows() if r["path"] == "tulips/alias.jpg")
    assert (link["status"], link["sha256"], link["width"]) == ("link", "", "")
    assert not (workspace.images / "tulips" / "alias.jpg").exists()
    metrics = workspace.metrics()
    assert metrics["archive_sha256"] is None and metrics["excluded"]["link"] == 1
    assert metrics["duplicates"] == [["roses/gray.jpg", "tulips/conflict.jpg"], ["roses/plain.jpg", "roses/twin.jpg"]]
    assert metrics["label_conflicts"] == [
        {
            "sha256": sha256(dataset / "roses" / "gray.jpg"),
            "labels": ["roses", "tulips"],
            "paths": ["roses/gray.jpg", "tulips/conflict.jpg"],
        }
    ]


def test_stage_downloads_from_a_url(tmp_path, flowers, workspace):
    archive = make_tgz(tmp_path / "flowers.tgz", flowers, arcname="flower_photos")
    handler = type("Handler", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/flowers.tgz"
        result = workspace.run(source=url, sha256=sha256(archive))
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 0, result.stderr
    assert workspace.metrics()["images"] == 16 and workspace.metrics()["source"] == url
    assert workspace.leftovers() == []  # the downloaded archive is not kept


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}/flowers.tgz"


def bad_source(case: str, tmp_path: Path, flowers: Path) -> tuple[dict, str]:
    """Builds one bad input; returns its download params and a regex its error must match."""
    if case == "checksum":
        archive = make_tgz(tmp_path / "f.tgz", flowers, "flowers")
        return {"source": str(archive), "sha256": "0" * 64}, (
            f"checksum mismatch .*expected sha256 {'0' * 64}, got {sha256(archive)}"
            f".*set download.sha256: {sha256(archive)}"
        )
    if case == "empty-sha256":
        archive = make_tgz(tmp_path / "f.tgz", flowers, "flowers")
        return {"source": str(archive), "sha256": ""}, f"sha256 is empty.*set download.sha256: {sha256(archive)}"
    members = {
        "traversal": (
            "flowers/roses/../../../evil.jpg",
            tarfile.REGTYPE,
            "",
            r"member 'flowers/roses/\.\./\.\./\.\./evil\.jpg' has a '\.\.' component",
        ),
        "absolute": ("/tmp/evil.jpg", tarfile.REGTYPE, "", r"member '/tmp/evil\.jpg' has an absolute path"),
        "symlink": (
            "flowers/roses/link.jpg",
            tarfile.SYMTYPE,
            "/etc/passwd",
            r"member 'flowers/roses/link\.jpg' is a symbolic link",
        ),
    }
    if case in members:
        name, kind, linkname, expected = members[case]
        archive = tar_with(tmp_path / "f.tgz", flowers, name, kind, linkname)
        return {"source": str(archive), "sha256": sha256(archive)}, "refusing to extract .*" + expected
    if case == "no-class-folders":
        flat = tmp_path / "flat"
        flat.mkdir()
        for file in sorted((flowers / "tulips").glob("t*.jpg")):
            file.rename(flat / file.name)
        archive = make_tgz(tmp_path / "f.tgz", flat, ".")
        return {
            "source": str(archive),
            "sha256": sha256(archive),
        }, r"no class folders found \(found: t0\.jpg, .*one sub-folder per class"
    if case == "one-class":
        archive = make_tgz(tmp_path / "f.tgz", flowers / "tulips", "data/tulips")
        return {
            "source": str(archive),
            "sha256": sha256(archive),
        }, r"fewer than 2 classes with usable images\. Usable images per class folder: tulips: 8 \("
    if case == "too-few":
        for index in range(6):
            (flowers / "tulips" / f"t{index}.jpg").unlink()
        archive = make_tgz(tmp_path / "f.tgz", flowers, "flowers")
        return {"source": str(archive), "sha256": sha256(archive)}, (
            r"class 'tulips' has 2 usable image\(s\) "
            r"\(excluded: 2 corrupt, 2 not-an-image, 1 too-large, 1 too-small\).*"
            r"download.min_images_per_class=5"
        )
    if case == "missing":
        return {"source": "nowhere/flowers.tgz", "sha256": "0" * 64}, r"nowhere/flowers\.tgz does not exist"
    if case == "dot-source":  # the repository itself: it contains data/raw, the stage's output
        expected = r"download\.source \. \(.*\) contains the folder the dataset is copied into"
        return {"source": ".", "sha256": ""}, expected
    if case == "bomb":  # far below the absolute 20 GiB bound, refused by the default expansion ratio
        archive = tmp_path / "f.tgz"
        with tarfile.open(archive, "w:gz") as tarball:
            tarball.add(flowers, arcname="flowers")
            info = tarfile.TarInfo("flowers/roses/zeros.bmp")
            info.size = 20 * 2**20
            tarball.addfile(info, io.BytesIO(bytes(info.size)))
        return {"source": str(archive), "sha256": sha256(archive), "max_total_bytes": 21474836480}, (
            r"refusing to extract .*f\.tgz: its \d+ bytes unpack to \d+ bytes, \d+ times as many, more than "
            r"download\.max_expansion_ratio=100"
        )
    if case == "unreachable":
        return {
            "source": closed_port_url(),
            "sha256": "0" * 64,
        }, r"could not download http://127\.0\.0\.1:.* after 1 attempt"
    raise AssertionError(case)


BAD_CASES = [
    "checksum",
    "empty-sha256",
    "traversal",
    "absolute",
    "symlink",
    "no-class-folders",
    "one-class",
    "too-few",
    "missing",
    "unreachable",
    "dot-source",
    "bomb",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_fails_clearly_and_writes_nothing(tmp_path, flowers, workspace, case):
    settings, expected = bad_source(case, tmp_path, flowers)
    result = workspace.run(**settings)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    message = result.stderr.split("download: error: ", 1)[1]
    assert re.search(expected, message, flags=re.S), message
    assert not workspace.images.exists() and not workspace.index.exists()
    assert not (workspace.root / "metrics" / "download.json").exists()
    assert workspace.leftovers() == []
    assert not Path("/tmp/evil.jpg").exists() and not (tmp_path / "evil.jpg").exists()


def test_a_failed_run_keeps_the_previous_outputs(tmp_path, flowers, workspace):
    archive = make_tgz(tmp_path / "good.tgz", flowers, "flowers")
    assert workspace.run(source=str(archive), sha256=sha256(archive)).returncode == 0
    before = {
        p.relative_to(workspace.root): p.read_bytes() for p in (workspace.root / "data").rglob("*") if p.is_file()
    }
    metrics_before = (workspace.root / "metrics" / "download.json").read_text()
    bad = tar_with(tmp_path / "bad.tgz", flowers, "flowers/roses/../../evil.jpg")
    result = workspace.run(source=str(bad), sha256=sha256(bad))
    assert result.returncode == 1 and "refusing to extract" in result.stderr
    after = {p.relative_to(workspace.root): p.read_bytes() for p in (workspace.root / "data").rglob("*") if p.is_file()}
    assert after == before
    assert (workspace.root / "metrics" / "download.json").read_text() == metrics_before
    assert workspace.leftovers() == []


def test_sigterm_during_a_download_exits_143_and_leaves_nothing(workspace):
    stop = threading.Event()

    class Drip(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            self.wfile.write(bytes(100_000))  # a first part that reaches archive.part at once
            while not stop.wait(0.05):  # then a slow server: the download is still running when SIGTERM comes
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    raw = workspace.root / "data" / "raw"
    try:
        with workspace.start(source=f"http://127.0.0.1:{server.server_address[1]}/f.tgz", sha256="0" * 64) as process:
            ends = time.monotonic() + 120
            while not any(p.stat().st_size for p in raw.glob(".download.*/archive.part")):
                assert process.poll() is None, process.communicate()[1]
                assert time.monotonic() < ends, "the download never started"
                time.sleep(0.1)
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=60)
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
    assert process.returncode == 143, stderr
    assert "download: terminated" in stderr and "Traceback" not in stderr
    assert workspace.leftovers() == []  # no .download.* (archive.part), .images.*.tmp or .index.csv.*.tmp
    assert not workspace.images.exists() and not workspace.index.exists()


@pytest.mark.slow
@pytest.mark.real_data
def test_real_flower_photos(tmp_path):
    archive = require_mirror(FLOWERS_ARCHIVE)
    workspace = Workspace(tmp_path / "repo")
    started = time.perf_counter()
    result = workspace.run(
        source=str(archive), sha256=FLOWERS_ARCHIVE_SHA256, min_image_side=32, max_image_pixels=89_478_485, retries=3
    )
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    metrics = workspace.metrics()
    assert metrics["images"] == 3670 and metrics["classes"] == 5
    assert metrics["images_per_class"] == {
        "daisy": 633,
        "dandelion": 898,
        "roses": 641,
        "sunflowers": 699,
        "tulips": 799,
    }
    assert sum(metrics["excluded"].values()) == 0
    conflict = ["roses/15922772266_1167a06620.jpg", "tulips/15922772266_1167a06620.jpg"]
    assert [c["paths"] for c in metrics["label_conflicts"]] == [conflict]  # the known roses/tulips photo
    rows = workspace.rows()
    assert len(rows) == 3670 and all(r["status"] == "ok" for r in rows)
    assert (workspace.images / "LICENSE.txt").is_file()
    print(f"\nreal flower_photos download stage: {seconds:.1f} s wall ({metrics['seconds']:.1f} s inside the stage)")
