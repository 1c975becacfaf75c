"""core.atomic: outputs complete or absent, and temporaries of killed runs removed only when provably stale."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from transferlab.core import atomic

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="owner checks read /proc (Linux)")

# A writer that opens an atomic file and an atomic folder, says so, then waits to be killed.
WRITER = textwrap.dedent(
    """
    import sys, time
    from transferlab.core import atomic
    with atomic.atomic_path(sys.argv[1]) as file, atomic.atomic_directory(sys.argv[2]) as folder:
        file.write_text("half")
        (folder / "part.npz").write_text("half")
        with atomic.temporary_directory(sys.argv[3], "download") as work:
            (work / "archive.part").write_text("half")
            print("ready", flush=True)
            time.sleep(60)
    """
)


def temporaries(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir() if entry.name.startswith("."))


def start_writer(tmp_path: Path) -> subprocess.Popen:
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path / "index.csv"), str(tmp_path / "features"), str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout.readline().strip() == "ready"
    return writer


def fabricated(folder: Path, name: str, *, pid: int, start: int, space=None, boot=None, suffix=".tmp") -> Path:
    space = space or atomic._space_token()
    boot = boot or atomic._boot_token()
    path = folder / f".{name}.@{space}{boot}-{pid}-{start}-abc_1234{suffix}"
    path.write_text("left behind")
    return path


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid  # reaped: no process has it now (PIDs are not reused this quickly)


def test_a_writer_killed_with_sigkill_leaves_temporaries_that_the_next_write_removes(tmp_path):
    writer = start_writer(tmp_path)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=10)
    left = temporaries(tmp_path)
    assert len(left) == 3 and all(f"-{writer.pid}-" in name for name in left)  # the owner is in the name
    atomic.write_text(tmp_path / "index.csv", "complete\n")
    assert len(temporaries(tmp_path)) == 2  # only index.csv's own temporary went
    with atomic.atomic_directory(tmp_path / "features") as folder:
        (folder / "train.npz").write_text("complete")
    with atomic.temporary_directory(tmp_path, "download"):
        pass
    assert temporaries(tmp_path) == []
    assert (tmp_path / "index.csv").read_text() == "complete\n"
    assert os.listdir(tmp_path / "features") == ["train.npz"]


def test_temporaries_of_a_live_writer_are_kept(tmp_path):
    writer = start_writer(tmp_path)
    try:
        left = temporaries(tmp_path)
        atomic.write_text(tmp_path / "index.csv", "complete\n")
        with atomic.atomic_directory(tmp_path / "features"):
            pass
        with atomic.temporary_directory(tmp_path, "download"):
            pass
        assert temporaries(tmp_path) == left and len(left) == 3
    finally:
        writer.kill()
        writer.wait(timeout=10)


def test_only_provably_stale_temporaries_of_the_same_target_are_removed(tmp_path):
    live_pid = os.getppid()  # alive for the whole test
    live_start = atomic._start_ticks(live_pid)
    gone = {
        "dead pid": fabricated(tmp_path, "metrics.json", pid=dead_pid(), start=1),
        "reused pid": fabricated(tmp_path, "metrics.json", pid=live_pid, start=live_start + 1),
        "earlier boot": fabricated(tmp_path, "metrics.json", pid=live_pid, start=live_start, boot="12345678"),
        "retired folder": fabricated(tmp_path, "metrics.json", pid=dead_pid(), start=1, suffix=".old"),
    }
    kept = {
        "live owner": fabricated(tmp_path, "metrics.json", pid=live_pid, start=live_start),
        "unknown start": fabricated(tmp_path, "metrics.json", pid=live_pid, start=0),
        "other host or container": fabricated(tmp_path, "metrics.json", pid=dead_pid(), start=1, space="deadbeef"),
        "another target": fabricated(tmp_path, "metrics.json.bak", pid=dead_pid(), start=1),
    }
    legacy = tmp_path / ".metrics.json.k2j4h5g6.tmp"  # from before owners were recorded: cannot be proven
    legacy.write_text("old")
    atomic.write_json(tmp_path / "metrics.json", {"a": 1})
    assert {why for why, path in gone.items() if path.exists()} == set()
    assert {why for why, path in kept.items() if not path.exists()} == set()
    assert legacy.exists()


def test_a_zombie_owner_counts_as_gone(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10
        while atomic._process_status(child.pid)[0] != "Z":  # exited, not reaped: it still holds its PID
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.01)
        stale = fabricated(tmp_path, "x", pid=child.pid, start=atomic._start_ticks(child.pid))
        assert atomic.remove_stale_temporaries(tmp_path, "x") == [stale]
    finally:
        child.wait()


def test_a_failed_write_leaves_the_target_as_it_was_and_no_temporary(tmp_path):
    atomic.write_text(tmp_path / "out.txt", "first\n")
    with pytest.raises(RuntimeError), atomic.atomic_path(tmp_path / "out.txt") as temporary:
        temporary.write_text("half")
        raise RuntimeError("crash")
    with pytest.raises(RuntimeError), atomic.atomic_directory(tmp_path / "folder") as folder:
        (folder / "a").write_text("half")
        raise RuntimeError("crash")
    assert (tmp_path / "out.txt").read_text() == "first\n"
    assert sorted(os.listdir(tmp_path)) == ["out.txt"]
