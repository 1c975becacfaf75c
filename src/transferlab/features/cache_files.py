"""Files kept in the embedding cache's folder beside the databases, each checked before it is used.

The cache folder holds what is expensive to make again: converted TFLite models, engine
verdicts (which engine or rewrite agreed, and how fast it ran) and saved Keras backbones. Any of
them may be damaged on disk (a flipped block, a truncated copy, an editor, another program), and
a damaged converted model still loads and runs: it only gives wrong embeddings. So every such
file has a sha256 recorded when it is written and checked when it is read back:

- A *record* is a JSON object that carries its own checksum: ``checksum`` is the sha256 of the
  canonical JSON of every other field. A verdict is a record.
- A binary file (a ``.tflite``, a ``.keras``) has its sha256 in a record written atomically
  *after* the file, so a record never vouches for a file that was not complete.

A record that is absent is simply computed. A record that is unparsable, has no checksum or
fails it, and a file whose bytes do not match its record, give one warning naming the file and
what happens next, and are recomputed: never used. The checksums guard against accidents, not
against someone who can write to the folder (see docs/DESIGN.md, "The embedding cache").
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from transferlab.core import atomic

LOGGER = logging.getLogger(__name__)
CHECKSUM_FIELD = "checksum"
_CHUNK_BYTES = 1 << 20


def content_sha256(content: bytes) -> str:
    """The hex sha256 of ``content``."""
    return hashlib.sha256(content).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes, read in chunks (a converted VGG16 is 0.5 GB)."""
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK_BYTES), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def record_checksum(payload: dict[str, Any]) -> str:
    """The sha256 of the canonical JSON of ``payload`` without its ``checksum`` field."""
    fields = {name: value for name, value in payload.items() if name != CHECKSUM_FIELD}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return content_sha256(canonical.encode("ascii"))


def write_record(path: str | os.PathLike, payload: dict[str, Any]) -> dict[str, Any]:
    """Writes ``payload`` plus its checksum to ``path`` atomically; returns the record as read back.

    The payload goes through JSON first (numpy scalars become numbers), so the checksum is of
    exactly what a reader parses.
    """
    plain = json.loads(json.dumps(payload, default=_plain))
    record = {**plain, CHECKSUM_FIELD: record_checksum(plain)}
    atomic.write_json(path, record)
    return record


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def record_path(path: str | os.PathLike) -> Path:
    """Where the sha256 record of a binary cache file lives: beside it, ``<name>.sha256.json``."""
    path = Path(path)
    return path.with_name(f"{path.name}.sha256.json")


def record_file(path: str | os.PathLike) -> str:
    """Records the sha256 of a complete file in its record (:func:`record_path`); returns it.

    Call it after the file is in place: the record is written atomically after the file, so it
    never vouches for a file that is not complete.
    """
    sha256 = file_sha256(path)
    write_record(record_path(path), {"file": Path(path).name, "sha256": sha256})
    return sha256


def intact_file_sha256(path: str | os.PathLike, *, consequence: str) -> str | None:
    """The sha256 of ``path`` if it exists and matches its record, else None.

    An absent file is no news (it is simply made); a file whose record is absent, damaged or
    different is warned about, with ``consequence`` (e.g. ``"saving it again"``).
    """
    path = Path(path)
    record_file_path = record_path(path)
    if not path.exists():
        return None
    record = read_record(record_file_path, consequence=consequence)
    if record is None:
        if not record_file_path.exists():
            _damaged(path, f"has no sha256 record ({record_file_path.name})", consequence)
        return None
    expected = record.get("sha256")
    return expected if file_matches(path, expected, record=record_file_path, consequence=consequence) else None


def read_record(path: str | os.PathLike, *, consequence: str) -> dict[str, Any] | None:
    """The record at ``path`` if it is intact; None if it is absent or damaged (with a warning).

    Args:
        path: a file written by :func:`write_record`.
        consequence: what the caller does instead, for the warning (e.g. ``"measuring again"``).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        return _damaged(path, f"cannot be read ({error})", consequence)
    try:
        record = json.loads(text)
    except ValueError as error:
        return _damaged(path, f"is not valid JSON ({error})", consequence)
    if not isinstance(record, dict):
        return _damaged(path, "does not hold a JSON object", consequence)
    if CHECKSUM_FIELD not in record:
        return _damaged(path, "has no checksum (damaged, or written by an older transferlab)", consequence)
    if record[CHECKSUM_FIELD] != record_checksum(record):
        return _damaged(path, "does not match its checksum", consequence)
    return record


def file_matches(path: str | os.PathLike, expected_sha256: Any, *, record: Path, consequence: str) -> bool:
    """Whether the file's bytes have the sha256 its record gives; warns when they do not.

    Args:
        path: the binary file (a converted model, a saved backbone).
        expected_sha256: the sha256 the record holds for it (anything else counts as no record).
        record: the record's path, for the warning.
        consequence: what the caller does instead, for the warning (e.g. ``"reconverting"``).
    """
    path = Path(path)
    if not isinstance(expected_sha256, str) or len(expected_sha256) != 64:
        _damaged(path, f"has no sha256 in its record {record.name}", consequence)
        return False
    try:
        actual = file_sha256(path)
    except FileNotFoundError:
        _damaged(path, f"is missing, though {record.name} records it", consequence)
        return False
    except OSError as error:
        _damaged(path, f"cannot be read ({error})", consequence)
        return False
    if actual != expected_sha256:
        _damaged(path, f"does not match the sha256 recorded in {record.name} (damaged on disk?)", consequence)
        return False
    return True


def _damaged(path: Path, problem: str, consequence: str) -> None:
    LOGGER.warning("Cache file %s %s; %s, it is not used as it is", path, problem, consequence)
    return None
