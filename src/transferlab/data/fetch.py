"""Getting a dataset's source onto disk: a URL, a local archive or a local folder; and checksums.

A source (``download.source``) is one of:

- an ``http(s)://`` URL of an archive: downloaded in a stream with a progress bar; a broken
  transfer is retried with exponential back-off and resumed with an HTTP Range request when the
  server supports it;
- a local archive (``.tgz``, ``.tar.gz``, ``.tar``, ``.zip``; recognised by content, extracted
  by :mod:`transferlab.data.archive`);
- a local folder holding one sub-folder per class (copied; symbolic links are skipped and
  listed in the index with status ``link``).

Relative local paths are resolved with :func:`transferlab.core.paths.resolve_param_path`. An
archive's sha256 is verified (:func:`verify_sha256`) before anything is extracted; an empty
``sha256`` is accepted only for a local folder.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import requests
from tqdm import tqdm

from transferlab.core import paths
from transferlab.data import archive, images, index, tables

LOGGER = logging.getLogger(__name__)
_RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_CHUNK_BYTES = 1 << 16  # a dropped connection loses at most the chunk in flight


def resolve_source(source: str, *, root: str | os.PathLike | None = None) -> tuple[str, Any]:
    """Tells what ``source`` is: ``("url", url)``, ``("archive", path)`` or ``("folder", path)``.

    Raises:
        ValueError: an unsupported URL scheme or a local path that does not exist.
    """
    source = source.strip()
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", source)
    if scheme:
        if scheme.group(1).lower() not in ("http", "https"):
            raise ValueError(
                f"download.source {source!r}: unsupported scheme '{scheme.group(1)}://'; use an http(s) URL, "
                "a local archive (.tgz, .tar.gz, .tar, .zip) or a local folder of class sub-folders"
            )
        return "url", source
    path = paths.resolve_param_path(source, root)
    if path.is_dir():
        return "folder", path
    if path.is_file():
        return "archive", path
    raise ValueError(
        f"download.source: {path} does not exist (source unreachable). Point download.source at an "
        "http(s) URL, a local archive (.tgz, .tar.gz, .tar, .zip) or a local folder of class sub-folders; "
        "relative paths are resolved against the repository root"
    )


# --------------------------------------------------------------------------------------------
# URLs


def download_url(
    url: str,
    destination: str | os.PathLike,
    *,
    retries: int,
    backoff_seconds: float = 1.0,
    timeout: float = 60.0,
    session: requests.Session | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Downloads ``url`` into ``destination`` with a progress bar, retrying broken transfers.

    A retry resumes from the bytes already received when the server answers a Range request
    with 206 Partial Content, and starts over otherwise. Waits ``backoff_seconds``, then twice
    that, and so on, between attempts.

    Raises:
        ValueError: an HTTP error that retrying cannot fix (404, 403, ...), or every attempt failed.
    """
    destination = Path(destination)
    session = session or requests.Session()
    last_error: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            wait = backoff_seconds * 2 ** (attempt - 1)
            LOGGER.warning("download failed (%s); retry %d of %d in %.1f s", last_error, attempt, retries, wait)
            sleep(wait)
        try:
            _fetch_once(session, url, destination, timeout=timeout)
            return destination
        except _PermanentHTTPError as error:
            raise ValueError(
                f"could not download {url}: {error}. Check download.source, or download the archive yourself "
                "and point download.source at the local file"
            ) from None
        except (requests.RequestException, _IncompleteTransfer) as error:
            last_error = error
    raise ValueError(
        f"could not download {url} after {retries + 1} attempt(s): {last_error}. Check the URL and the "
        "network, raise download.retries, or point download.source at a local copy of the archive"
    )


class _PermanentHTTPError(Exception):
    """An HTTP status that another attempt would not change."""


class _IncompleteTransfer(Exception):
    """The connection ended before the announced number of bytes arrived."""


def _fetch_once(session: requests.Session, url: str, destination: Path, *, timeout: float) -> None:
    have = destination.stat().st_size if destination.exists() else 0
    # identity: the bytes on disk must be the bytes the checksum was taken of.
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    with session.get(url, stream=True, timeout=timeout, headers=headers) as response:
        start = _resume_offset(response, have, destination)
        if start == 0 and have:
            LOGGER.info("the server does not resume downloads; starting over")
        length = response.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else None
        with (
            open(destination, "r+b" if start else "wb") as handle,
            tqdm(
                total=total,
                initial=start,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"download {PurePosixPath(url.split('?')[0]).name}",
                disable=None,
                mininterval=0.5,
            ) as progress,
        ):
            handle.seek(start)
            handle.truncate()
            for chunk in response.iter_content(_CHUNK_BYTES):
                handle.write(chunk)
                progress.update(len(chunk))
    received = destination.stat().st_size
    if total is not None and received < total:
        raise _IncompleteTransfer(f"the connection closed after {received} of {total} bytes")


def _resume_offset(response: requests.Response, have: int, destination: Path) -> int:
    status = response.status_code
    if status == 200:
        return 0
    if status == 206 and have and response.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
        return have
    if status in (206, 416) and have:  # the server cannot continue our partial file: start over
        destination.unlink()
        raise _IncompleteTransfer(f"the server could not resume the download (HTTP {status})")
    if status in _RETRYABLE_STATUS:
        raise requests.HTTPError(f"HTTP {status} {response.reason}")
    raise _PermanentHTTPError(f"HTTP {status} {response.reason}")


# --------------------------------------------------------------------------------------------
# Checksums


def verify_sha256(archive_path: str | os.PathLike, *, expected: str, source: str) -> str:
    """Checks the archive's sha256 before anything is extracted; returns it.

    Raises:
        ValueError: ``expected`` is empty (an archive must be pinned) or differs; the message
            gives both digests and what to do.
    """
    got = images.sha256_file(archive_path)
    if not expected:
        raise ValueError(
            f"download.sha256 is empty, but {source} is an archive, which must be verified before it is "
            f"extracted. Its sha256 is {got}; if you trust this file, set download.sha256: {got}"
        )
    if got != expected.lower():
        raise ValueError(
            f"checksum mismatch for {source}: expected sha256 {expected}, got {got}. The file is damaged, "
            "incomplete or a different version; nothing was extracted. Download it again, or, if you "
            f"trust this file, set download.sha256: {got}"
        )
    return got


# --------------------------------------------------------------------------------------------
# Local folders


def copy_folder(source: Path, destination: Path, *, max_files: int, max_total_bytes: int) -> list[tables.IndexRow]:
    """Copies a local dataset folder into ``destination``; returns index rows for what it skipped.

    The dataset root is located as for an archive. Symbolic links are never followed or copied
    (rows with status ``link``); devices, FIFOs and sockets are not copied (``not-an-image``).

    Raises:
        ValueError: more files or bytes than the bounds allow.
    """
    root = index.locate_dataset_root(source)
    destination.mkdir(parents=True, exist_ok=True)
    skipped: list[tables.IndexRow] = []
    count, total = 0, 0
    for entry in index.visible_entries(root):
        for file in [entry] if not index.is_real_dir(entry) else index.walk_files(entry):
            relative = file.relative_to(root).as_posix()
            if file.is_symlink() or not file.is_file():
                if index.is_real_dir(entry):
                    skipped.append(index.skipped_row(file, relative))
                else:  # beside the class folders: not part of the index
                    LOGGER.warning("skipped %s: not a regular file (links are not followed)", file)
                continue
            count, total = count + 1, total + file.stat().st_size
            archive.check_bounds(source, count, total, max_files, max_total_bytes, verb="copy")
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target)
    return skipped
