"""Atomic writes: every output is either complete or absent, and no temporary outlives its owner.

A stage writes into a temporary sibling and renames it into place only once it is complete,
so a crash or a killed run never leaves a half-written file or folder behind.

A run killed with SIGKILL (or a power cut) cannot remove its temporaries, so each temporary's
name records who owns it: ``.<target>.@<space><boot>-<pid>-<start>-<random>.tmp``, where
``space`` is a hash of the host name and PID namespace (whose PIDs this process can check),
``boot`` a hash of the kernel's boot id, and ``start`` the owner's start time in clock ticks
(``/proc/<pid>/stat``). Whenever a new temporary is made for a target, the stale temporaries of
that same target beside it are removed, but only those whose owner is provably gone: same
PID space, and the machine rebooted since, or the PID is not running, is a zombie, or now
belongs to a process that started at another time (PID reuse). A temporary whose owner may be
alive (another host, another container, an unknown start time) is never touched.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOGGER = logging.getLogger(__name__)
_UNKNOWN = "0" * 8  # a token that could not be read (no /proc): never proves anything
# What follows ".<target>." in a temporary's name; tempfile's random part is [a-z0-9_]{8}.
_OWNED_SUFFIX = re.compile(
    r"@(?P<space>[0-9a-f]{8})(?P<boot>[0-9a-f]{8})-(?P<pid>[0-9]+)-(?P<start>[0-9]+)-[a-z0-9_]+\.(?:tmp|old)"
)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary file path beside ``path``; renames it onto ``path`` on success.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent, target.name)
    handle, temporary = tempfile.mkstemp(prefix=_owned_prefix(target.name), suffix=".tmp", dir=target.parent)
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        os.chmod(temporary_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are ordinary files
        os.replace(temporary_path, target)
    finally:
        temporary_path.unlink(missing_ok=True)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Writes ``payload`` as indented, key-sorted JSON to ``path`` atomically."""
    write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays reach the metrics writers; JSON has no type for them.
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty temporary directory beside ``path``; swaps it in for ``path`` on success.

    On an exception the temporary directory is removed and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent, target.name)
    temporary = Path(tempfile.mkdtemp(prefix=_owned_prefix(target.name), suffix=".tmp", dir=target.parent))
    try:
        yield temporary
        os.chmod(temporary, 0o777 & ~_umask())  # mkdtemp makes 0700
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=_owned_prefix(target.name), suffix=".old", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(temporary, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(temporary, target)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)


@contextlib.contextmanager
def temporary_directory(parent: str | os.PathLike, name: str) -> Iterator[Path]:
    """Yields a scratch folder ``.<name>.@<owner>-....tmp`` in ``parent``; removes it on exit.

    Like :class:`tempfile.TemporaryDirectory`, but the name records its owner, so the stale
    scratch folders of a killed run (same ``name``, owner provably gone) are removed first.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(parent, name)
    folder = Path(tempfile.mkdtemp(prefix=_owned_prefix(name), suffix=".tmp", dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Owners of temporaries


def remove_stale_temporaries(folder: str | os.PathLike, name: str) -> list[Path]:
    """Removes the temporaries of target ``name`` in ``folder`` whose owner is provably gone.

    Only names this module makes are considered (``.<name>.@<owner>-<random>.tmp`` or ``.old``);
    a temporary whose owner may still be running is kept.

    Returns:
        The temporaries removed.
    """
    prefix = f".{name}."
    removed = []
    try:
        entries = [entry for entry in os.scandir(folder) if entry.name.startswith(prefix)]
    except OSError:  # an unreadable folder: the write itself will say what is wrong
        return removed
    for entry in entries:
        owner = _OWNED_SUFFIX.fullmatch(entry.name[len(prefix) :])
        if owner is None or not _owner_is_gone(owner):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        if not path.exists():
            LOGGER.info("removed %s, left behind by process %s, which is no longer running", path, owner["pid"])
            removed.append(path)
    return removed


def _owned_prefix(name: str) -> str:
    return f".{name}.@{_owner_tag()}-"


def _owner_tag() -> str:
    pid = os.getpid()
    return f"{_space_token()}{_boot_token()}-{pid}-{_start_ticks(pid) or 0}"


def _owner_is_gone(owner: re.Match[str]) -> bool:
    # Anything not provable means "may be alive": a temporary is kept rather than pulled away
    # from under a running writer.
    if os.name != "posix" or owner["space"] != _space_token():
        return False  # another host or container (or Windows, where os.kill(pid, 0) would kill)
    if _UNKNOWN not in (owner["boot"], _boot_token()) and owner["boot"] != _boot_token():
        return True  # written before the last reboot: every process of that boot is gone
    pid, start = int(owner["pid"]), int(owner["start"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        pass  # PermissionError: it exists, owned by another user
    status = _process_status(pid)
    if status is None:
        return False
    state, ticks = status
    return state in ("Z", "X") or (start != 0 and ticks != start)


def _process_status(pid: int) -> tuple[str, int] | None:
    """A process's state letter and start time in clock ticks since boot (Linux), or ``None``."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")".
    fields = text[text.rfind(")") + 2 :].split()
    try:
        return fields[0], int(fields[19])  # fields 3 and 22 of proc(5)
    except (IndexError, ValueError):
        return None


def _start_ticks(pid: int) -> int | None:
    status = _process_status(pid)
    return None if status is None else status[1]


@functools.lru_cache(maxsize=1)
def _space_token() -> str:
    # PIDs are comparable only within one PID namespace on one host.
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return hashlib.sha256(f"{socket.gethostname()}\0{namespace}".encode()).hexdigest()[:8]


@functools.lru_cache(maxsize=1)
def _boot_token() -> str:
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        return _UNKNOWN
    return hashlib.sha256(boot_id.encode()).hexdigest()[:8]
