"""The download stage's logic: fetch the dataset, verify it, extract it safely and index it.

A source is one of:

- an ``http(s)://`` URL of an archive: downloaded in a stream with a progress bar; a broken
  transfer is retried with exponential back-off and resumed with an HTTP Range request when the
  server supports it;
- a local archive (``.tgz``, ``.tar.gz``, ``.tar``, ``.zip``; recognised by content);
- a local folder holding one sub-folder per class (copied; symbolic links are skipped and
  listed in the index with status ``link``).

Relative local paths are resolved with :func:`transferlab.core.paths.resolve_param_path`.

An archive's sha256 is verified before anything is extracted; an empty ``sha256`` is accepted
only for a local folder. Extraction refuses the whole archive, naming the member, when any member
has an absolute path, a ``..`` component, is a link or a device/FIFO, or when the members exceed
the file-count or unpacked-size bounds; ``tarfile``'s ``data`` filter and ``zipfile``'s own name
sanitising are a second layer.

The dataset root is the extracted folder, descending through a single wrapping folder such as
``flower_photos/``. Its visible sub-folders are the classes; files beside them (``LICENSE.txt``)
are kept but not indexed; hidden entries and ``__MACOSX`` at the root are dropped. Every file
under a class folder (recursively) gets one index row; hidden files (``.DS_Store``) and files in
hidden folders are ``not-an-image``; the others are checked with
:func:`transferlab.data.images.inspect_image` in worker processes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import functools
import logging
import os
import re
import shutil
import stat
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Sequence

import requests
from tqdm import tqdm

from transferlab.core import atomic, paths
from transferlab.data import images

LOGGER = logging.getLogger(__name__)

INDEX_COLUMNS = ("path", "label", "sha256", "width", "height", "status", "detail")
LINK = "link"
EXCLUDED_STATUSES = (images.CORRUPT, images.NOT_AN_IMAGE, images.TOO_SMALL, images.TOO_LARGE, LINK)
ARCHIVE_SUFFIXES = (".tgz", ".tar.gz", ".tar", ".zip")
# Lists in metrics/download.json stop here (the index has every row); counts are always complete.
MAX_LISTED = 100
IGNORED_ROOT_ENTRIES = frozenset({"__MACOSX"})
_RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_CHUNK_BYTES = 1 << 16  # a dropped connection loses at most the chunk in flight
_HIDDEN_DETAIL = "hidden file or folder (name starts with '.'): not used as an image"


@dataclasses.dataclass(frozen=True)
class IndexRow:
    """One row of ``data/raw/index.csv`` (columns :data:`INDEX_COLUMNS`)."""

    path: str
    label: str
    sha256: str
    width: int | None
    height: int | None
    status: str
    detail: str

    def as_csv(self) -> dict[str, str]:
        """The row as strings, sizes empty when unknown."""
        row = dataclasses.asdict(self)
        row["width"] = "" if self.width is None else str(self.width)
        row["height"] = "" if self.height is None else str(self.height)
        return row


@dataclasses.dataclass(frozen=True)
class DownloadResult:
    """What :func:`prepare_dataset` made: the index rows (sorted by path) and the report."""

    rows: list[IndexRow]
    metrics: dict[str, Any]


# --------------------------------------------------------------------------------------------
# The whole stage


def prepare_dataset(
    *,
    source: str,
    sha256: str,
    destination: str | os.PathLike,
    min_image_side: int,
    min_images_per_class: int,
    max_files: int,
    max_total_bytes: int,
    max_image_pixels: int,
    retries: int,
    workers: int = 2,
    root: str | os.PathLike | None = None,
    backoff_seconds: float = 1.0,
) -> DownloadResult:
    """Fetches, verifies, extracts and indexes a dataset into ``destination``.

    ``destination`` should be an empty temporary folder (the stage swaps it in for
    ``data/raw/images`` only when this returns); working files go into a temporary folder beside
    it and are removed whatever happens.

    Args:
        source: URL, local archive or local folder (see the module docstring).
        sha256: the archive's expected sha256; may be empty only for a local folder.
        destination: folder that receives the class folders.
        min_image_side: shorter side below this makes an image ``too-small``.
        min_images_per_class: a class with fewer usable images stops the stage.
        max_files: most archive members / folder files accepted.
        max_total_bytes: most bytes unpacked / copied.
        max_image_pixels: larger images are ``too-large`` (decompression bombs).
        retries: how often a broken download is retried.
        workers: processes that check images.
        root: the folder relative local paths are resolved against (default: the repository root).
        backoff_seconds: first wait before a retry; it doubles each time.

    Returns:
        The index rows and the metrics report.

    Raises:
        ValueError: unreachable source, checksum mismatch, unsafe or damaged archive, no class
            folders, fewer than two classes with usable images, a class with too few images.
    """
    started = time.perf_counter()
    destination = Path(destination)
    kind, location = resolve_source(source, root=root)
    with tempfile.TemporaryDirectory(prefix=".download.", dir=destination.parent) as work:
        skipped: list[IndexRow] = []
        archive_sha256 = None
        if kind == "folder":
            if sha256:
                LOGGER.info("download.sha256 is not used for a local folder source (%s)", location)
            skipped = copy_folder(location, destination, max_files=max_files, max_total_bytes=max_total_bytes)
        else:
            archive = location
            if kind == "url":
                archive = Path(work) / "archive.part"
                download_url(location, archive, retries=retries, backoff_seconds=backoff_seconds)
            archive_sha256 = verify_sha256(archive, expected=sha256, source=source)
            extracted = Path(work) / "extracted"
            extract_archive(archive, extracted, max_files=max_files, max_total_bytes=max_total_bytes)
            move_dataset(locate_dataset_root(extracted), destination)
        rows = index_dataset(
            destination, extra_rows=skipped, min_image_side=min_image_side,
            max_image_pixels=max_image_pixels, max_files=max_files, workers=workers,
        )
    classes = [folder.name for folder in class_folders(destination)]
    check_classes(rows, min_images_per_class=min_images_per_class, classes=classes, source=source)
    metrics = summarize(rows, source=source, archive_sha256=archive_sha256, seconds=time.perf_counter() - started)
    return DownloadResult(rows=rows, metrics=metrics)


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
# Fetching and verifying


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
        with open(destination, "r+b" if start else "wb") as handle, tqdm(
            total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
            desc=f"download {PurePosixPath(url.split('?')[0]).name}", disable=None, mininterval=0.5,
        ) as progress:
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


def verify_sha256(archive: str | os.PathLike, *, expected: str, source: str) -> str:
    """Checks the archive's sha256 before anything is extracted; returns it.

    Raises:
        ValueError: ``expected`` is empty (an archive must be pinned) or differs; the message
            gives both digests and what to do.
    """
    got = images.sha256_file(archive)
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
# Safe extraction


def extract_archive(
    archive: str | os.PathLike, destination: str | os.PathLike, *, max_files: int, max_total_bytes: int
) -> None:
    """Extracts a tar (any compression) or zip archive after checking every member.

    Raises:
        ValueError: not a supported archive, damaged, or an unsafe member (named in the message);
            then nothing is kept.
    """
    archive, destination = Path(archive), Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, destination, max_files=max_files, max_total_bytes=max_total_bytes)
            return
        try:
            handle = tarfile.open(archive, mode="r:*")
        except tarfile.ReadError:
            raise ValueError(
                f"{archive} is not a supported archive; use a .tgz, .tar.gz, .tar or .zip file, "
                "or a folder of class sub-folders"
            ) from None
        with handle:
            _extract_tar(handle, archive, destination, max_files=max_files, max_total_bytes=max_total_bytes)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, RuntimeError) as error:
        if isinstance(error, tarfile.FilterError):
            raise ValueError(f"refusing to extract {archive}: {error}") from None
        raise ValueError(
            f"cannot extract {archive}: {type(error).__name__}: {error}. If the archive is damaged or "
            "encrypted, download or pack it again"
        ) from None


def _extract_tar(
    handle: tarfile.TarFile, archive: Path, destination: Path, *, max_files: int, max_total_bytes: int
) -> None:
    members = handle.getmembers()
    for member in members:
        _check_member_name(member.name, archive)
        _check_tar_member_type(member, archive)
    _check_bounds(archive, len(members), sum(m.size for m in members if m.isfile()), max_files, max_total_bytes)
    handle.extractall(destination, members=members, filter="data")


def _check_tar_member_type(member: tarfile.TarInfo, archive: Path) -> None:
    if member.issym() or member.islnk():
        kind = "a symbolic link" if member.issym() else "a hard link"
        _refuse(archive, member.name, f"is {kind} (to '{member.linkname}')")
    if member.isdev():
        _refuse(archive, member.name, "is a device file or FIFO")
    if not (member.isfile() or member.isdir()):
        _refuse(archive, member.name, f"has an unsupported type ({member.type!r})")


def _extract_zip(archive: Path, destination: Path, *, max_files: int, max_total_bytes: int) -> None:
    with zipfile.ZipFile(archive) as handle:
        members = handle.infolist()
        for member in members:
            _check_member_name(member.filename, archive)
            _check_zip_member_type(member, archive)
        _check_bounds(archive, len(members), sum(m.file_size for m in members), max_files, max_total_bytes)
        for member in members:
            handle.extract(member, destination)


def _check_zip_member_type(member: zipfile.ZipInfo, archive: Path) -> None:
    mode = member.external_attr >> 16  # Unix mode bits, when the zip was made on Unix
    if stat.S_ISLNK(mode):
        _refuse(archive, member.filename, "is a symbolic link")
    if mode and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        _refuse(archive, member.filename, "is a device file, FIFO or socket")


def _check_member_name(name: str, archive: Path) -> None:
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or re.match(r"^[A-Za-z]:", normalized):
        _refuse(archive, name, "has an absolute path")
    if ".." in normalized.split("/"):
        _refuse(archive, name, "has a '..' component (it would be written outside the target folder)")
    if "\x00" in name:
        _refuse(archive, name, "has a NUL character in its name")


def _check_bounds(
    source: Path, count: int, total_bytes: int, max_files: int, max_total_bytes: int, verb: str = "extract"
) -> None:
    if count > max_files:
        raise ValueError(
            f"refusing to {verb} {source}: it has {count} members, more than download.max_files={max_files}; "
            "raise download.max_files if you trust this source"
        )
    if total_bytes > max_total_bytes:
        raise ValueError(
            f"refusing to {verb} {source}: it unpacks to {total_bytes} bytes, more than "
            f"download.max_total_bytes={max_total_bytes}; raise download.max_total_bytes if you trust this source"
        )


def _refuse(archive: Path, member: str, reason: str) -> None:
    raise ValueError(
        f"refusing to extract {archive}: member {member!r} {reason}. Nothing was extracted; the archive is "
        "unsafe or was not made for this tool. Use a trusted archive of class folders holding plain files"
    )


# --------------------------------------------------------------------------------------------
# The dataset root and local folders


def locate_dataset_root(folder: str | os.PathLike) -> Path:
    """Finds the folder whose sub-folders are the classes.

    Descends while the folder holds nothing visible but one sub-folder that itself has
    sub-folders (``flower_photos/``), so a single class folder is never mistaken for a wrapper.
    """
    root = Path(folder)
    while True:
        entries = _visible_entries(root)
        folders = [entry for entry in entries if _is_real_dir(entry)]
        if len(entries) == 1 and len(folders) == 1 and any(_is_real_dir(e) for e in _visible_entries(folders[0])):
            root = folders[0]
        else:
            return root


def _visible_entries(folder: Path) -> list[Path]:
    return sorted(
        entry for entry in folder.iterdir() if not entry.name.startswith(".") and entry.name not in IGNORED_ROOT_ENTRIES
    )


def _is_real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def class_folders(root: str | os.PathLike) -> list[Path]:
    """The class folders of a dataset root: its visible real sub-folders, sorted by name."""
    return [entry for entry in _visible_entries(Path(root)) if _is_real_dir(entry)]


def move_dataset(root: Path, destination: Path) -> None:
    """Moves the visible entries of ``root`` (class folders, LICENSE.txt, ...) into ``destination``."""
    destination.mkdir(parents=True, exist_ok=True)
    for entry in _visible_entries(root):
        os.replace(entry, destination / entry.name)


def copy_folder(source: Path, destination: Path, *, max_files: int, max_total_bytes: int) -> list[IndexRow]:
    """Copies a local dataset folder into ``destination``; returns index rows for what it skipped.

    The dataset root is located as for an archive. Symbolic links are never followed or copied
    (rows with status ``link``); devices, FIFOs and sockets are not copied (``not-an-image``).

    Raises:
        ValueError: more files or bytes than the bounds allow.
    """
    root = locate_dataset_root(source)
    destination.mkdir(parents=True, exist_ok=True)
    skipped: list[IndexRow] = []
    count, total = 0, 0
    for entry in _visible_entries(root):
        for file in [entry] if not _is_real_dir(entry) else _walk_files(entry):
            relative = file.relative_to(root).as_posix()
            if file.is_symlink() or not file.is_file():
                if _is_real_dir(entry):
                    skipped.append(_skipped_row(file, relative))
                else:  # beside the class folders: not part of the index
                    LOGGER.warning("skipped %s: not a regular file (links are not followed)", file)
                continue
            count, total = count + 1, total + file.stat().st_size
            _check_bounds(source, count, total, max_files, max_total_bytes, verb="copy")
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target)
    return skipped


def _walk_files(folder: Path) -> Iterable[Path]:
    for directory, subfolders, files in os.walk(folder):  # does not descend into linked folders
        here = Path(directory)
        yield from (here / name for name in sorted(files))
        yield from (here / name for name in sorted(subfolders) if (here / name).is_symlink())


def _skipped_row(file: Path, relative: str) -> IndexRow:
    label = relative.split("/")[0]
    if file.is_symlink():
        detail = f"symbolic link to {os.readlink(file)}: links are not followed; copy the file into the folder instead"
        return IndexRow(relative, label, "", None, None, LINK, detail)
    detail = "not a regular file (device, FIFO or socket): not copied"
    return IndexRow(relative, label, "", None, None, images.NOT_AN_IMAGE, detail)


# --------------------------------------------------------------------------------------------
# The index


def index_dataset(
    root: str | os.PathLike,
    *,
    min_image_side: int,
    max_image_pixels: int,
    max_files: int,
    workers: int = 2,
    extra_rows: Sequence[IndexRow] = (),
) -> list[IndexRow]:
    """One row per file under each class folder of ``root``, sorted by path.

    Raises:
        ValueError: ``root`` has no class folders, or more than ``max_files`` files.
    """
    root = Path(root)
    classes = class_folders(root)
    if not classes:
        found = ", ".join(entry.name for entry in _visible_entries(root)[:10]) or "nothing"
        raise ValueError(
            f"no class folders found (found: {found}). The images must sit in one sub-folder per class, "
            "e.g. flower_photos/daisy/1.jpg and flower_photos/roses/2.jpg; put them in class folders"
        )
    relatives = [file.relative_to(root).as_posix() for folder in classes for file in _walk_files(folder)]
    if len(relatives) > max_files:
        raise ValueError(f"{len(relatives)} files in the class folders, more than download.max_files={max_files}")
    checks = _check_files(
        root, relatives, min_image_side=min_image_side, max_image_pixels=max_image_pixels, workers=workers
    )
    rows = [_index_row(relative, check) for relative, check in zip(relatives, checks)]
    return sorted([*rows, *extra_rows], key=lambda row: row.path)


def _index_row(relative: str, check: images.ImageCheck) -> IndexRow:
    _require_utf8(relative)
    label = relative.split("/")[0]
    return IndexRow(relative, label, check.sha256, check.width, check.height, check.status, check.detail)


def _require_utf8(relative: str) -> None:
    try:
        relative.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"file name {relative!r} is not valid UTF-8 and cannot be written to the index; rename it"
        ) from None


def _check_files(
    root: Path, relatives: list[str], *, min_image_side: int, max_image_pixels: int, workers: int
) -> list[images.ImageCheck]:
    check = functools.partial(_check_file, str(root), min_image_side=min_image_side, max_image_pixels=max_image_pixels)
    progress = functools.partial(
        tqdm, total=len(relatives), desc="check images", unit="file", disable=None, mininterval=0.5
    )
    if workers <= 1 or len(relatives) < 2:
        return list(progress(map(check, relatives)))
    chunksize = max(1, min(64, len(relatives) // (workers * 8)))
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        return list(progress(pool.map(check, relatives, chunksize=chunksize)))


def _check_file(root: str, relative: str, *, min_image_side: int, max_image_pixels: int) -> images.ImageCheck:
    path = os.path.join(root, relative)
    if os.path.islink(path):  # extraction and copying never make links; never follow one anyway
        return images.ImageCheck("", None, None, LINK, f"symbolic link to {os.readlink(path)}: not followed")
    if any(part.startswith(".") for part in relative.split("/")):
        try:
            digest = images.sha256_file(path)
        except OSError:
            digest = ""
        return images.ImageCheck(digest, None, None, images.NOT_AN_IMAGE, _HIDDEN_DETAIL)
    return images.inspect_image(path, min_image_side=min_image_side, max_image_pixels=max_image_pixels)


def check_classes(
    rows: Sequence[IndexRow], *, min_images_per_class: int, classes: Iterable[str] = (), source: str = "the dataset"
) -> None:
    """Stops a dataset that cannot be split: under two usable classes, or a class too small.

    Args:
        rows: the index rows.
        min_images_per_class: least number of ``ok`` images a class needs.
        classes: class folder names, so that an empty class folder counts too.
        source: what to call the dataset in messages.

    Raises:
        ValueError: naming the classes, their usable counts and their exclusions.
    """
    usable = collections.Counter(row.label for row in rows if row.status == images.OK)
    labels = sorted({row.label for row in rows} | set(classes))
    if sum(1 for label in labels if usable[label]) < 2:
        found = ", ".join(f"{label} ({usable[label]})" for label in labels) or "none"
        raise ValueError(
            f"{source} has fewer than 2 classes with usable images (class folders and usable images: {found}). "
            "A classifier needs at least 2 class folders, each holding its images: <root>/<class>/<image>"
        )
    small = [label for label in labels if usable[label] < min_images_per_class]
    if small:
        described = "; ".join(_describe_class(rows, label, usable[label]) for label in small)
        raise ValueError(
            f"too few usable images to split: {described}. Each class needs at least "
            f"download.min_images_per_class={min_images_per_class}; add images, remove the class folder, "
            "or lower download.min_images_per_class"
        )


def _describe_class(rows: Sequence[IndexRow], label: str, usable: int) -> str:
    excluded = collections.Counter(row.status for row in rows if row.label == label and row.status != images.OK)
    reasons = ", ".join(f"{count} {status}" for status, count in sorted(excluded.items()))
    return f"class '{label}' has {usable} usable image(s)" + (f" (excluded: {reasons})" if reasons else "")


# --------------------------------------------------------------------------------------------
# Outputs


def summarize(rows: Sequence[IndexRow], *, source: str, archive_sha256: str | None, seconds: float) -> dict[str, Any]:
    """The content of ``metrics/download.json`` (see docs/DESIGN.md)."""
    ok = [row for row in rows if row.status == images.OK]
    per_class = collections.Counter(row.label for row in ok)
    excluded = [row for row in rows if row.status != images.OK]
    by_content: dict[str, list[IndexRow]] = collections.defaultdict(list)
    for row in ok:
        by_content[row.sha256].append(row)
    groups = sorted((sorted(r.path for r in group) for group in by_content.values() if len(group) > 1))
    conflicts = [
        {"sha256": digest, "labels": sorted({r.label for r in group}), "paths": sorted(r.path for r in group)}
        for digest, group in sorted(by_content.items())
        if len({r.label for r in group}) > 1
    ]
    return {
        "source": source,
        "archive_sha256": archive_sha256,
        "images": len(ok),
        "classes": len(per_class),
        "images_per_class": dict(sorted(per_class.items())),
        "excluded": {status: sum(1 for row in excluded if row.status == status) for status in EXCLUDED_STATUSES},
        "excluded_files": [{"path": r.path, "status": r.status, "detail": r.detail} for r in excluded[:MAX_LISTED]],
        "duplicate_groups": len(groups),
        "duplicates": groups[:MAX_LISTED],
        "label_conflict_groups": len(conflicts),
        "label_conflicts": conflicts[:MAX_LISTED],
        "listed_at_most": MAX_LISTED,
        "seconds": round(seconds, 3),
    }


def write_index(rows: Iterable[IndexRow], path: str | os.PathLike) -> None:
    """Writes ``data/raw/index.csv`` atomically (columns :data:`INDEX_COLUMNS`, rows in given order)."""
    with atomic.atomic_path(path) as temporary:
        with temporary.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=INDEX_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(row.as_csv() for row in rows)
