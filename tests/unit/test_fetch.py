"""Bounded fetching (issue 14, items 3 and 8): byte cap, overall deadline, bounded back-off,
raw bytes whatever the Content-Encoding, and a folder source that would copy itself.

Every server here is a local socket server on 127.0.0.1 in a thread, so a test controls each
byte and its timing (an endless body, one byte at a time, a gzip label on a .tgz); each test
is bounded by a deadline of a few seconds.
"""

from __future__ import annotations

import gzip
import hashlib
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from transferlab.core import params
from transferlab.data import download, fetch

DEADLINE = 2.0  # seconds: the deadline the slow-server tests give a download
SLACK = 3.0  # seconds a download may overrun it (thread start-up, a loaded 2-core machine)


class SocketServer:
    """A local HTTP server whose handler writes raw bytes to the socket (status line, headers, body).

    ``respond(connection, stopped)`` runs in its own thread per request; ``stopped`` is set when
    the test ends, so an endless or dripping response stops there.
    """

    def __init__(self, respond: Callable[[socket.socket, threading.Event], None]):
        self.respond, self.stopped, self.requests = respond, threading.Event(), []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/pets.tgz"
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self):
        while not self.stopped.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._handle, args=(connection,), daemon=True).start()

    def _handle(self, connection: socket.socket):
        with connection:
            connection.settimeout(5)
            request = b""
            while b"\r\n\r\n" not in request:
                piece = connection.recv(4096)
                if not piece:
                    return
                request += piece
            self.requests.append(request.decode("latin-1"))
            try:
                self.respond(connection, self.stopped)
            except OSError:  # the client went away: that is what these tests provoke
                pass

    def __enter__(self) -> SocketServer:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self.thread.join(5)
        self.listener.close()


def headers(*lines: str) -> bytes:
    return ("HTTP/1.1 200 OK\r\n" + "".join(f"{line}\r\n" for line in lines) + "\r\n").encode("latin-1")


def endless_body(connection, stopped):
    connection.sendall(headers("Content-Type: application/octet-stream", "Connection: close"))
    chunk = bytes(1 << 16)
    while not stopped.is_set():
        connection.sendall(chunk)


DRIP_SECONDS = 8.0  # a dripping server gives up after this, so a broken deadline fails the test, not hangs it


def drip(connection, stopped, first: bytes):
    connection.sendall(first)
    ends = time.monotonic() + DRIP_SECONDS
    while not stopped.wait(0.2) and time.monotonic() < ends:  # one byte every 0.2 s: inside any read timeout
        connection.sendall(b"x")


def drip_body(connection, stopped):
    drip(connection, stopped, headers("Content-Length: 1000000"))


def drip_headers(connection, stopped):
    drip(connection, stopped, b"HTTP/1.1 200 OK\r\nX-Slow: ")


def fetch_url(url: str, destination: Path, **overrides):
    settings = dict(retries=0, max_bytes=10**8, deadline_seconds=30.0, sleep=lambda seconds: None)
    return fetch.download_url(url, destination, **{**settings, **overrides})


# ---------------------------------------------------------------------------------- byte cap


def test_an_endless_body_stops_at_the_byte_cap_and_leaves_no_partial_file(tmp_path):
    started = time.monotonic()
    with SocketServer(endless_body) as server:
        with pytest.raises(
            ValueError,
            match=r"refusing to download .*more than 1000000 bytes arrived.*"
            r"download\.max_total_bytes=1000000.*partial file was removed",
        ):
            fetch_url(server.url, tmp_path / "a.part", max_bytes=1_000_000, retries=3)
    assert not (tmp_path / "a.part").exists()
    assert len(server.requests) == 1  # too large is final: no retry
    assert time.monotonic() - started < SLACK


def test_an_announced_length_over_the_cap_is_refused_before_any_byte_is_written(tmp_path):
    def huge(connection, stopped):
        connection.sendall(headers(f"Content-Length: {10**12}"))
        stopped.wait(5)

    with SocketServer(huge) as server:
        with pytest.raises(
            ValueError,
            match=r"the server announced 1000000000000 bytes, more than "
            r"download\.max_total_bytes=5000",
        ):
            fetch_url(server.url, tmp_path / "a.part", max_bytes=5000)
    assert not (tmp_path / "a.part").exists()


def test_a_body_of_exactly_the_cap_is_accepted(tmp_path):
    payload = np.random.default_rng(0).bytes(5000)

    def exact(connection, stopped):
        connection.sendall(headers(f"Content-Length: {len(payload)}") + payload)

    with SocketServer(exact) as server:
        assert fetch_url(server.url, tmp_path / "a.part", max_bytes=5000).read_bytes() == payload


# ---------------------------------------------------------------------------------- deadline


@pytest.mark.parametrize("respond", [drip_body, drip_headers], ids=["body", "headers"])
def test_a_server_dripping_one_byte_at_a_time_hits_the_overall_deadline(tmp_path, respond):
    started = time.monotonic()
    with SocketServer(respond) as server:
        with pytest.raises(
            ValueError,
            match=r"could not download .* within download\.deadline_seconds=2 "
            r"\(1 attempt\(s\) failed.*raise download\.deadline_seconds",
        ):
            # a 60 s read timeout never fires: each read gets a byte within 0.2 s
            fetch_url(server.url, tmp_path / "a.part", deadline_seconds=DEADLINE, timeout=60.0, retries=5)
    elapsed = time.monotonic() - started
    assert DEADLINE - 0.1 <= elapsed < DEADLINE + SLACK
    assert not (tmp_path / "a.part").exists()
    assert len(server.requests) == 1  # past the deadline, no retry starts


def status_server(status: int) -> Callable[[socket.socket, threading.Event], None]:
    def respond(connection, stopped):
        connection.sendall(f"HTTP/1.1 {status} Oops\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())

    return respond


def test_back_off_doubles_up_to_the_longest_wait(tmp_path):
    waits = []
    with SocketServer(status_server(503)) as server:
        with pytest.raises(ValueError, match=r"after 11 attempt\(s\): HTTP 503"):
            fetch_url(
                server.url,
                tmp_path / "a.part",
                retries=10,
                backoff_seconds=1.0,
                deadline_seconds=10_000,
                sleep=waits.append,
            )
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]  # fetch.MAX_WAIT_SECONDS caps each wait
    assert fetch.MAX_WAIT_SECONDS == 60


def test_no_wait_runs_past_the_deadline(tmp_path):
    waits = []
    started = time.monotonic()
    with SocketServer(status_server(503)) as server:
        with pytest.raises(
            ValueError,
            match=r"within download\.deadline_seconds=5 \(1 attempt\(s\) failed; "
            r"last error: HTTP 503",
        ):
            fetch_url(
                server.url,
                tmp_path / "a.part",
                retries=5,
                backoff_seconds=10.0,
                deadline_seconds=5.0,
                sleep=waits.append,
            )
    assert waits == [] and len(server.requests) == 1  # a 10 s wait would end after the deadline: give up now
    assert time.monotonic() - started < SLACK


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("retries", 11, r"download\.retries: Input should be less than or equal to 10"),
        ("retries", 20, r"download\.retries: Input should be less than or equal to 10"),
        ("deadline_seconds", 0, r"download\.deadline_seconds: Input should be greater than or equal to 1"),
        ("max_expansion_ratio", 0.5, r"download\.max_expansion_ratio: Input should be greater than or equal to 1"),
    ],
)
def test_download_bounds_out_of_range_are_params_errors(key, value, expected):
    with pytest.raises(ValueError, match=expected):
        params.parse_section("download", {key: value})


def test_download_bound_defaults():
    defaults = params.DownloadParams()
    assert defaults.retries == 3 and defaults.deadline_seconds == 3600 and defaults.max_expansion_ratio == 100


# ---------------------------------------------------------------------------------- raw bytes


def test_a_gzip_content_encoding_label_is_not_decoded(tmp_path):
    tgz = gzip.compress(np.random.default_rng(1).bytes(20_000) + bytes(20_000))  # a .tgz is gzip bytes

    def labelled(connection, stopped):
        connection.sendall(
            headers("Content-Type: application/x-tar", "Content-Encoding: x-gzip", f"Content-Length: {len(tgz)}") + tgz
        )

    with SocketServer(labelled) as server:
        path = fetch_url(server.url, tmp_path / "a.part")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == hashlib.sha256(tgz).hexdigest()
    assert "accept-encoding: identity" in server.requests[0].lower()


# ---------------------------------------------------------------------------------- folder sources


def make_classes(folder: Path) -> Path:
    for name in ("cats", "dogs"):
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "0.jpg").write_bytes(b"not decoded here")
    return folder


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (".", r"contains the folder the dataset is copied into"),
        ("raw", r"contains the folder the dataset is copied into"),
        ("raw/images", r"is the folder the dataset is copied into"),
        ("raw/images/inner", r"lies inside the folder the dataset is copied into"),
    ],
)
def test_a_folder_source_overlapping_the_destination_is_refused_before_copying(tmp_path, source, expected):
    make_classes(tmp_path)
    destination = tmp_path / "raw" / "images"
    make_classes(destination / "inner")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match=r"download\.source .*" + expected + r" .*Point download\.source at"):
        fetch.copy_folder(tmp_path / source, destination, max_files=100, max_total_bytes=10**6)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing copied


def test_download_source_dot_is_refused_with_one_clear_error(tmp_path):
    make_classes(tmp_path)
    destination = tmp_path / "data" / "raw" / "images"
    destination.mkdir(parents=True)
    with pytest.raises(ValueError, match=r"download\.source \. \(.*\) contains the folder the dataset is copied into"):
        download.prepare_dataset(
            source=".",
            root=tmp_path,
            sha256="",
            destination=destination,
            min_image_side=1,
            min_images_per_class=2,
            max_files=100,
            max_total_bytes=10**6,
            max_expansion_ratio=100,
            max_image_pixels=10**6,
            retries=0,
            deadline_seconds=30,
            workers=1,
        )
    assert list(destination.iterdir()) == []
    assert list((tmp_path / "data" / "raw").iterdir()) == [destination]  # no working folder left either


def test_a_sibling_of_the_destination_is_a_fine_source(tmp_path):
    source = make_classes(tmp_path / "photos")
    destination = tmp_path / "photos_copy"  # shares a name prefix, not a path
    destination.mkdir()
    fetch.copy_folder(source, destination, max_files=100, max_total_bytes=10**6)
    assert sorted(p.name for p in destination.iterdir()) == ["cats", "dogs"]


# ---------------------------------------------------------------------------------- s3:// sources (no server needed)


def test_the_s3_listing_fingerprint_ignores_order_and_etag_quotes():
    listing = [("a/1.jpg", 4, '"abc"'), ("b/2.jpg", 5, "def")]

    assert fetch.s3_fingerprint(listing) == fetch.s3_fingerprint([listing[1], ("a/1.jpg", 4, "abc")])
    assert fetch.s3_fingerprint(listing) != fetch.s3_fingerprint(listing[:1])
    assert fetch.s3_fingerprint(listing) != fetch.s3_fingerprint([("a/1.jpg", 5, "abc"), listing[1]])


def test_an_s3_url_without_a_bucket_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"names no bucket; write s3://bucket/prefix/"):
        fetch.fetch_s3("s3:///photos/", tmp_path, max_files=10, max_total_bytes=10)
