"""The tests' S3 server (tests/s3_server.py): it answers with its key, refuses everyone else, and stops for good."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import s3_server as s3


def _gone(pgid: int, wait: float = 5.0) -> bool:
    """True when process group ``pgid`` has no live member left (zombies count as gone: some inits never reap them)."""
    deadline = time.monotonic() + wait
    while True:
        alive = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                # "pid (comm) state ppid pgrp ...": split after the command name, which may hold spaces.
                state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
            except (OSError, IndexError):
                continue
            if int(group) == pgid and state != "Z":
                alive.append(stat.parent.name)
        if not alive:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def test_answers_with_its_key(s3_server, s3_bucket):
    fs = s3_server.filesystem()
    fs.pipe(f"{s3_bucket}/daisy/one.jpg", b"bytes")

    assert fs.cat(f"{s3_bucket}/daisy/one.jpg") == b"bytes"
    assert s3_server.endpoint_url.startswith("http://127.0.0.1:")


def test_refuses_anonymous_requests(s3_server, s3_bucket):
    s3_server.filesystem().pipe(f"{s3_bucket}/secret.txt", b"private")
    anonymous = s3_server.filesystem(anon=True, key=None, secret=None)

    with pytest.raises(PermissionError):
        anonymous.cat(f"{s3_bucket}/secret.txt")
    with pytest.raises(PermissionError):
        anonymous.pipe(f"{s3_bucket}/planted.txt", b"x")
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(f"{s3_server.endpoint_url}/{s3_bucket}/secret.txt", timeout=10)
    assert raised.value.code == 403


@pytest.mark.parametrize("field", ["key", "secret"])
def test_refuses_a_wrong_key_or_secret(s3_server, s3_bucket, field):
    wrong = s3_server.filesystem(**{field: "not-the-" + field})

    with pytest.raises(PermissionError):
        wrong.ls(s3_bucket)


def test_env_points_a_subprocess_at_the_server(s3_server, s3_bucket):
    """The AWS_* variables alone (AWS_ENDPOINT_URL included) reach the server: what dvc and the stages get."""
    s3_server.filesystem().pipe(f"{s3_bucket}/roses/a.jpg", b"a")
    code = f"import s3fs, json; print(json.dumps(s3fs.S3FileSystem().find({s3_bucket!r})))"
    clean = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}

    result = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **s3_server.env()}, capture_output=True, text=True, timeout=120
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [f"{s3_bucket}/roses/a.jpg"]


def test_make_bucket_names_are_unique(s3_server):
    first, second = s3_server.make_bucket(), s3_server.make_bucket()

    assert first != second
    assert {first, second} <= set(s3_server.filesystem().ls(""))


def test_stop_kills_a_group_that_ignores_sigterm():
    # A leader that ignores SIGTERM, with a child in its group: both must be gone after the grace period.
    process = subprocess.Popen(
        ["sh", "-c", "trap '' TERM; echo ready; sleep 120 & wait"], start_new_session=True, stdout=subprocess.PIPE
    )
    assert process.stdout.readline() == b"ready\n"  # the trap is set: a SIGTERM sent earlier would end the shell
    process.stdout.close()

    s3.stop_process_group(process, grace=0.5)

    assert process.returncode == -9
    assert _gone(process.pid)


@pytest.mark.slow
def test_stop_leaves_no_server_behind(tmp_path):
    server = s3.S3Server(tmp_path, grace=1.0).start()
    pid, port = server.process.pid, server.ports["s3"]

    server.stop()
    server.stop()  # twice is harmless

    assert _gone(pid)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert server not in s3._LIVE


@pytest.mark.slow
def test_a_server_that_never_answers_fails_with_weeds_log(tmp_path):
    server = s3.S3Server(tmp_path, startup_timeout=0.01, grace=0.5)

    with pytest.raises(RuntimeError, match="did not answer .* log"):
        server.start(attempts=1)

    assert _gone(server.process.pid)


SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "local_s3.sh"


def _free_block(size: int = 8) -> int:
    """A port P with P..P+size-1 all free on 127.0.0.1 (the block local_s3.sh takes)."""
    for _ in range(50):
        base = s3.free_ports(1)[0]
        if base + size > 65535:
            continue
        try:
            held = []
            for port in range(base, base + size):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError("no block of free ports")


@pytest.mark.slow
def test_local_s3_script_serves_with_the_printed_credentials_only(tmp_path):
    port = _free_block()
    log = tmp_path / "script.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            ["bash", str(SCRIPT), str(tmp_path / "s3"), str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while "export AWS_DEFAULT_REGION" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        exported = dict(line.split()[1].split("=", 1) for line in log.read_text().splitlines() if "export " in line)
        assert exported["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{port}"
        server = s3.S3Server(tmp_path / "unused", access_key=exported["AWS_ACCESS_KEY_ID"])
        server.secret_key, server.endpoint_url = exported["AWS_SECRET_ACCESS_KEY"], exported["AWS_ENDPOINT_URL"]
        fs, error = server.filesystem(), None
        while time.monotonic() < deadline:
            try:
                fs.pipe("team-bucket/hello.txt", b"hi")  # buckets are created on first upload
                break
            except Exception as failure:  # noqa: BLE001 - not up yet
                error = failure
                time.sleep(0.25)
        else:
            raise AssertionError(f"local_s3.sh never answered ({error}):\n{log.read_text()}")
        assert fs.cat("team-bucket/hello.txt") == b"hi"
        with pytest.raises(PermissionError):
            server.filesystem(anon=True, key=None, secret=None).cat("team-bucket/hello.txt")
        assert (tmp_path / "s3" / "identities.json").stat().st_mode & 0o077 == 0
    finally:
        s3.stop_process_group(process, grace=1.0)
    assert _gone(process.pid)


def test_local_s3_script_refuses_a_bad_port(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT), str(tmp_path), "80"], capture_output=True, text=True, timeout=30)

    assert result.returncode == 2 and "S3_PORT must be a number from 1024 to 65527" in result.stderr
    assert not (tmp_path / "identities.json").exists()
