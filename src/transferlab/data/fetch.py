"""Getting a dataset's source onto disk: a URL, a local archive or a local folder; and checksums.

A source (``download.source``) is one of:

- an ``http(s)://`` URL of an archive: downloaded in a stream with a progress bar; a broken
  transfer is retried with exponential back-off and resumed with an HTTP Range request when the
  server supports it. A download is bounded, because a hostile or broken server must not fill
  the disk or hang the pipeline: at most ``download.max_total_bytes`` bytes, everything
  (attempts and waits) within ``download.deadline_seconds``, each wait at most
  :data:`MAX_WAIT_SECONDS`. The bytes are stored as sent, never Content-decoded, so the
  sha256 checked is the archive's;
- a local archive (``.tgz``, ``.tar.gz``, ``.tar``, ``.zip``; recognised by content, extracted
  by :mod:`transferlab.data.archive`);
- a local folder holding one sub-folder per class (copied; symbolic links are skipped and
  listed in the index with status ``link``; a folder that contains the destination, such as
  ``.``, is refused before anything is copied);
- an ``s3://bucket/key`` of an archive object (downloaded, then handled as a local archive) or an
  ``s3://bucket/prefix/`` holding one sub-folder of objects per class (listed, checked against
  the bounds and for unsafe keys before any object is downloaded into the stage's scratch folder,
  then handled as an extracted archive). The listing's fingerprint, a sha256 over the sorted
  (key, size, ETag) triples, tells whether the bucket changed (:func:`fetch_s3`). Credentials and
  the endpoint come from the standard AWS configuration (``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for SeaweedFS or MinIO, ``~/.aws``), never from
  params.yaml; s3fs (fsspec, which DVC uses too) is imported only for these sources.

Relative local paths are resolved with :func:`transferlab.core.paths.resolve_param_path`. An
archive's sha256 is verified (:func:`verify_sha256`) before anything is extracted; an empty
``sha256`` is accepted only for a local folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import requests
import requests.adapters
import urllib3.exceptions
from tqdm import tqdm

from transferlab.core import paths
from transferlab.data import archive, images, index, tables

LOGGER = logging.getLogger(__name__)
_RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_CHUNK_BYTES = 1 << 16  # a dropped connection loses at most the chunk in flight
# The longest single wait between attempts: with download.retries <= 10 the waits add up to at most
# about 5 minutes, and download.deadline_seconds bounds everything anyway.
MAX_WAIT_SECONDS = 60.0


def resolve_source(source: str, *, root: str | os.PathLike | None = None) -> tuple[str, Any]:
    """Tells what ``source`` is: ``("url", url)``, ``("s3", url)``, ``("archive", path)`` or ``("folder", path)``.

    Raises:
        ValueError: an unsupported URL scheme or a local path that does not exist.
    """
    source = source.strip()
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", source)
    if scheme:
        if scheme.group(1).lower() == "s3":
            return "s3", source
        if scheme.group(1).lower() not in ("http", "https"):
            raise ValueError(
                f"download.source {source!r}: unsupported scheme '{scheme.group(1)}://'; use an http(s) URL, "
                "an s3:// object or prefix, a local archive (.tgz, .tar.gz, .tar, .zip) or a local folder of "
                "class sub-folders"
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
    max_bytes: int,
    deadline_seconds: float,
    backoff_seconds: float = 1.0,
    max_wait_seconds: float = MAX_WAIT_SECONDS,
    timeout: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Downloads ``url`` into ``destination`` with a progress bar, retrying broken transfers.

    A retry resumes from the bytes already received when the server answers a Range request
    with 206 Partial Content, and starts over otherwise. Waits ``backoff_seconds``, then twice
    that, and so on (each wait at most ``max_wait_seconds``), between attempts. The bytes are
    stored as sent: a ``Content-Encoding`` header (Apache labels a .tgz ``x-gzip``) is never
    decoded, so the file's sha256 is the archive's.

    Args:
        url: an http(s) URL.
        destination: the file to write; removed again when the download fails.
        retries: attempts after the first one.
        max_bytes: the most bytes accepted (``download.max_total_bytes``); a larger body stops
            the download at once.
        deadline_seconds: the whole download, every attempt and wait included, ends by then.
        backoff_seconds: the first wait before a retry.
        max_wait_seconds: the longest single wait.
        timeout: the longest wait for the connection and for each read.
        sleep: waits between attempts (tests pass a recorder).

    Returns:
        ``destination``.

    Raises:
        ValueError: an HTTP error that retrying cannot fix (404, 403, ...), a body larger than
            ``max_bytes``, the deadline passed, or every attempt failed.
    """
    destination = Path(destination)
    deadline = time.monotonic() + deadline_seconds
    try:
        with _Watchdog(deadline_seconds) as watchdog, _watched_session(watchdog) as session:
            attempts = _Attempts(url, deadline=deadline, deadline_seconds=deadline_seconds, watchdog=watchdog)
            for attempt in range(retries + 1):
                if attempt:
                    attempts.wait(min(backoff_seconds * 2 ** (attempt - 1), max_wait_seconds), retries, sleep)
                try:
                    _fetch_once(session, url, destination, timeout=attempts.timeout(timeout), max_bytes=max_bytes)
                    if watchdog.expired:  # a cut connection can look like a complete one (no Content-Length)
                        attempts.failed(_IncompleteTransfer("the deadline cut the transfer short"))
                    return destination
                except _PermanentHTTPError as error:
                    raise ValueError(
                        f"could not download {url}: {error}. Check download.source, or download the archive "
                        "yourself and point download.source at the local file"
                    ) from None
                except (requests.RequestException, urllib3.exceptions.HTTPError, _IncompleteTransfer) as error:
                    attempts.failed(error)
            raise ValueError(
                f"could not download {url} after {retries + 1} attempt(s): {attempts.last_error}. Check the URL "
                "and the network, raise download.retries, or point download.source at a local copy of the archive"
            )
    except BaseException:
        destination.unlink(missing_ok=True)  # complete or absent: a failed download leaves no partial file
        raise


class _PermanentHTTPError(Exception):
    """An HTTP status that another attempt would not change."""


class _IncompleteTransfer(Exception):
    """The connection ended before the announced number of bytes arrived."""


class _Attempts:
    """The retry loop's bookkeeping: the last error, and the deadline every attempt and wait shares."""

    def __init__(self, url: str, *, deadline: float, deadline_seconds: float, watchdog: _Watchdog):
        self.url, self.deadline, self.deadline_seconds, self.watchdog = url, deadline, deadline_seconds, watchdog
        self.count = 0
        self.last_error: Exception | None = None

    def timeout(self, longest: float) -> float:
        """The connection and read timeout for the next attempt: never past the deadline."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.deadline_error()
        return min(longest, left)

    def failed(self, error: Exception) -> None:
        """Records a failed attempt; past the deadline that ends the download."""
        self.count += 1
        self.last_error = error
        if self.watchdog.expired or time.monotonic() >= self.deadline:
            raise self.deadline_error() from None

    def wait(self, seconds: float, retries: int, sleep: Callable[[float], None]) -> None:
        """Waits before a retry, unless the retry could not start before the deadline."""
        if time.monotonic() + seconds >= self.deadline:
            raise self.deadline_error()
        LOGGER.warning("download failed (%s); retry %d of %d in %.1f s", self.last_error, self.count, retries, seconds)
        sleep(seconds)

    def deadline_error(self) -> ValueError:
        return ValueError(
            f"could not download {self.url} within download.deadline_seconds={self.deadline_seconds:g} "
            f"({self.count} attempt(s) failed; last error: {self.last_error or 'the server was too slow'}). "
            "The server is too slow or stalls; raise download.deadline_seconds, or download the archive yourself "
            "and point download.source at the local file"
        )


class _Watchdog:
    """Shuts down every socket of a download when its deadline passes.

    A read timeout restarts with every byte, so a server that sends one byte every 20 s never
    trips a 60 s timeout; checking the clock between reads does not help either while a read
    is blocked in the headers. Shutting the socket down from a timer thread wakes the blocked
    read at once, wherever it is; the read then fails and the retry loop sees the deadline.
    """

    def __init__(self, seconds: float):
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(seconds, 0.0), self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()

    def watch(self, sock: socket.socket) -> None:
        """Adds a freshly connected socket (shut down at once when the deadline has passed)."""
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shutdown(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed: nothing left to wake
        pass


class _WatchedAdapter(requests.adapters.HTTPAdapter):
    """An adapter whose connections hand their socket to a :class:`_Watchdog` once connected."""

    def __init__(self, watchdog: _Watchdog):
        self._watchdog = watchdog
        super().__init__()

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        pool = super().get_connection_with_tls_context(request, verify, proxies=proxies, cert=cert)
        if getattr(pool.ConnectionCls, "watched_by", None) is not self._watchdog:
            watchdog = self._watchdog

            class WatchedConnection(pool.ConnectionCls):
                watched_by = watchdog

                def connect(self) -> None:
                    super().connect()
                    watchdog.watch(self.sock)

            pool.ConnectionCls = WatchedConnection  # this pool only: the class attribute stays as it was
        return pool


def _watched_session(watchdog: _Watchdog) -> requests.Session:
    session = requests.Session()
    adapter = _WatchedAdapter(watchdog)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _fetch_once(session: requests.Session, url: str, destination: Path, *, timeout: float, max_bytes: int) -> None:
    have = destination.stat().st_size if destination.exists() else 0
    # identity: ask for the bytes themselves; servers that encode anyway are read raw below.
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    with session.get(url, stream=True, timeout=timeout, headers=headers) as response:
        start = _resume_offset(response, have, destination)
        if start == 0 and have:
            LOGGER.info("the server does not resume downloads; starting over")
        if response.headers.get("Content-Encoding", "identity").lower() != "identity":
            LOGGER.info(
                "the server labels the archive Content-Encoding: %s; keeping the bytes as sent",
                response.headers["Content-Encoding"],
            )
        length = response.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else None
        if total is not None and total > max_bytes:
            raise _too_large(url, max_bytes, f"the server announced {total} bytes")
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
            received = start
            # read1: whatever has arrived, up to a chunk; decode_content=False: the bytes as sent
            # (iter_content would undo a Content-Encoding and change the archive's sha256).
            while chunk := response.raw.read1(_CHUNK_BYTES, decode_content=False):
                received += len(chunk)
                if received > max_bytes:
                    raise _too_large(url, max_bytes, f"more than {max_bytes} bytes arrived")
                handle.write(chunk)
                progress.update(len(chunk))
    received = destination.stat().st_size
    if total is not None and received < total:
        raise _IncompleteTransfer(f"the connection closed after {received} of {total} bytes")


def _too_large(url: str, max_bytes: int, what: str) -> ValueError:
    return ValueError(
        f"refusing to download {url}: {what}, more than download.max_total_bytes={max_bytes}. The partial file "
        "was removed; raise download.max_total_bytes if you trust this source"
    )


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
# S3 (and S3-compatible) object storage


@dataclasses.dataclass(frozen=True)
class S3Fetch:
    """What :func:`fetch_s3` left in the scratch folder.

    Attributes:
        kind: ``"archive"`` (one archive file, to verify and extract) or ``"staged"`` (a folder
            of class folders, already listed, bounded and name-checked).
        path: the archive file or the staged folder.
        fingerprint: for a prefix, :func:`s3_fingerprint` of its listing; None for an archive
            (its sha256 pins it).
        objects: objects downloaded.
    """

    kind: str
    path: Path
    fingerprint: str | None
    objects: int


def fetch_s3(url: str, work: str | os.PathLike, *, max_files: int, max_total_bytes: int) -> S3Fetch:
    """Downloads an ``s3://`` source into the scratch folder ``work``.

    ``s3://bucket/key`` naming an object is an archive: downloaded as ``work/archive.part``,
    refused first when larger than ``max_total_bytes``. Anything else, and every URL ending in
    ``/``, is a prefix holding one sub-folder per class: every object under it is listed first,
    and the whole source is refused, before any object is downloaded, when a key has a ``..``
    component or an absolute path (the archive rules) or the objects exceed the bounds. The
    objects then go into ``work/s3`` with their keys (less the prefix) as paths.

    Args:
        url: ``s3://bucket/key`` or ``s3://bucket/prefix/``; the bucket alone means all of it.
        work: an empty scratch folder, removed by the caller.
        max_files: most objects accepted (``download.max_files``).
        max_total_bytes: most bytes accepted (``download.max_total_bytes``).

    Returns:
        What was fetched, with the listing's fingerprint for a prefix.

    Raises:
        ValueError: one line naming what failed and what to do: s3fs missing, no or refused
            credentials, a missing bucket, key or prefix, an unreachable endpoint, an unsafe key,
            more objects or bytes than the bounds.
    """
    work = Path(work)
    bucket, key = _split_s3_url(url)
    fs = _s3_filesystem(url)
    with _s3_errors(url, fs, bucket):
        found = fs.info(f"{bucket}/{key}") if key and not url.endswith("/") else None
        if found is not None and found.get("type") == "file":
            return _fetch_s3_archive(fs, url, found, work / "archive.part", max_total_bytes=max_total_bytes)
        return _fetch_s3_prefix(fs, url, bucket, key, work / "s3", max_files=max_files, max_total_bytes=max_total_bytes)


def s3_fingerprint(objects: list[tuple[str, int, str]]) -> str:
    """sha256 over the sorted (key, size, ETag) triples of a listing: changes when any object is added,
    removed, renamed or rewritten (a rewrite changes the ETag even at the same size)."""
    canonical = json.dumps(sorted([key, int(size), etag.strip('"')] for key, size, etag in objects))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _split_s3_url(url: str) -> tuple[str, str]:
    rest = re.sub(r"^[Ss]3://", "", url)
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(
            f"download.source {url!r} names no bucket; write s3://bucket/prefix/ (a folder of class folders) "
            "or s3://bucket/archive.tgz"
        )
    return bucket, key.strip("/")


def _s3_filesystem(url: str):
    """An s3fs filesystem configured from the standard AWS environment (never from params.yaml)."""
    try:
        import s3fs
    except ImportError:
        raise ValueError(f"download.source {url} needs the s3fs package: pip install s3fs") from None
    # A fresh instance: s3fs caches filesystems by arguments, which would keep stale credentials.
    return s3fs.S3FileSystem(skip_instance_cache=True, config_kwargs={"connect_timeout": 10, "read_timeout": 60})


def _endpoint() -> str:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return endpoint or "AWS S3 (set AWS_ENDPOINT_URL for another S3 server)"


_CREDENTIALS_ADVICE = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for this bucket, and AWS_ENDPOINT_URL for a "
    "server other than AWS; credentials never go in params.yaml"
)


@contextlib.contextmanager
def _s3_errors(url: str, fs: Any, bucket: str):
    """Turns s3fs/botocore errors into one ValueError line: what went wrong and what to do."""
    from botocore import exceptions as botocore_errors

    try:
        yield
    except ValueError:
        raise
    except FileNotFoundError:
        raise ValueError(_missing(url, fs, bucket)) from None
    except PermissionError as error:
        raise ValueError(
            f"download.source {url}: the S3 server at {_endpoint()} refused access ({error}); {_CREDENTIALS_ADVICE}"
        ) from None
    except botocore_errors.NoCredentialsError:
        raise ValueError(f"download.source {url}: no S3 credentials found; {_CREDENTIALS_ADVICE}") from None
    except (OSError, botocore_errors.BotoCoreError, botocore_errors.ClientError) as error:
        raise ValueError(
            f"download.source {url}: S3 request to {_endpoint()} failed ({type(error).__name__}: {error}). Check "
            "that the server is reachable and AWS_ENDPOINT_URL, then run the stage again"
        ) from None


def _missing(url: str, fs: Any, bucket: str) -> str:
    try:
        fs.info(bucket)
    except FileNotFoundError:
        return (
            f"download.source {url}: bucket '{bucket}' does not exist at {_endpoint()}. Fix the bucket name in "
            "download.source (or AWS_ENDPOINT_URL), or create the bucket and upload the dataset"
        )
    except Exception:  # noqa: BLE001 - the first error already says enough; this only refines it
        pass
    return (
        f"download.source {url}: no such object or prefix in bucket '{bucket}'. Upload the dataset there (one "
        "sub-folder of images per class, or an archive), or fix download.source"
    )


def _fetch_s3_archive(fs: Any, url: str, found: dict, destination: Path, *, max_total_bytes: int) -> S3Fetch:
    if int(found.get("size") or 0) > max_total_bytes:
        raise _too_large(url, max_total_bytes, f"the object has {found['size']} bytes")
    fs.get_file(found["name"], str(destination), callback=_progress(f"download {PurePosixPath(url).name}"))
    if destination.stat().st_size > max_total_bytes:  # replaced by a larger object meanwhile
        raise _too_large(url, max_total_bytes, f"{destination.stat().st_size} bytes arrived")
    return S3Fetch(kind="archive", path=destination, fingerprint=None, objects=1)


def _fetch_s3_prefix(
    fs: Any, url: str, bucket: str, key: str, staged: Path, *, max_files: int, max_total_bytes: int
) -> S3Fetch:
    prefix = f"{bucket}/{key}/" if key else f"{bucket}/"
    listing = fs.find(prefix, detail=True)
    objects = sorted(
        (name[len(prefix) :], int(info.get("size") or 0), str(info.get("ETag", "")))
        for name, info in listing.items()
        if info.get("type") == "file" and not name.endswith("/")
    )
    if not objects:
        raise FileNotFoundError(prefix)
    for relative, _, _ in objects:
        archive.check_member_name(relative, url)  # the archive rules: no absolute path, no '..', no NUL
    archive.check_bounds(url, len(objects), sum(size for _, size, _ in objects), max_files, max_total_bytes, "download")
    local = [staged / relative for relative, _, _ in objects]
    for path in {path.parent for path in local}:
        path.mkdir(parents=True, exist_ok=True)
    fs.get([prefix + relative for relative, _, _ in objects], [str(path) for path in local], callback=_progress(url))
    received = sum(path.stat().st_size for path in local)  # objects may have been replaced meanwhile
    archive.check_bounds(url, len(local), received, max_files, max_total_bytes, "download")
    LOGGER.info("downloaded %d objects from %s", len(objects), url)
    return S3Fetch(kind="staged", path=staged, fingerprint=s3_fingerprint(objects), objects=len(objects))


def _progress(description: str):
    from fsspec.callbacks import TqdmCallback

    return TqdmCallback(tqdm_kwargs={"desc": description, "disable": None, "mininterval": 0.5})


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


def copy_folder(
    source: Path, destination: Path, *, max_files: int, max_total_bytes: int, name: str | None = None
) -> list[tables.IndexRow]:
    """Copies a local dataset folder into ``destination``; returns index rows for what it skipped.

    The dataset root is located as for an archive. Symbolic links are never followed or copied
    (rows with status ``link``); devices, FIFOs and sockets are not copied (``not-an-image``).
    ``name`` is ``download.source`` as written in params, for messages.

    Raises:
        ValueError: ``source`` contains ``destination``, equals it or lies inside it (checked
            before anything is copied), or more files or bytes than the bounds allow.
    """
    check_not_overlapping(source, destination, name=name)
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


def check_not_overlapping(source: Path, destination: Path, *, name: str | None = None) -> None:
    """Refuses a source folder that contains ``destination``, equals it or lies inside it.

    ``download.source: .`` (the repository) contains ``data/raw``: copying it would copy the
    copy into itself until the paths grow too long.

    Args:
        source: the source folder.
        destination: the folder the dataset is copied into.
        name: ``download.source`` as written in params, for the message (default: ``source``).

    Raises:
        ValueError: naming both folders.
    """
    source_real, destination_real = Path(os.path.realpath(source)), Path(os.path.realpath(destination))
    shown = f"{name} ({source_real})" if name is not None and name != str(source_real) else str(source_real)
    if source_real == destination_real or destination_real.is_relative_to(source_real):
        where = "is" if source_real == destination_real else "contains"
        raise ValueError(
            f"download.source {shown} {where} the folder the dataset is copied into ({destination_real}); it "
            "would copy its own copy. Point download.source at the folder that holds the class folders, outside "
            "the stage's output folder"
        )
    if source_real.is_relative_to(destination_real):
        raise ValueError(
            f"download.source {shown} lies inside the folder the dataset is copied into ({destination_real}). "
            "Point download.source at the folder that holds the class folders, outside the stage's output folder"
        )
