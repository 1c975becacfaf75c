"""Safe archive extraction: a tar (any compression) or zip is checked member by member first.

An archive from the internet may try to write outside the target folder or plant links, devices
or a decompression bomb. Extraction refuses the whole archive, naming the member, when any member
has an absolute path, a ``..`` component, is a link or a device/FIFO, or when the members exceed
the file-count or unpacked-size bounds (``download.max_files``, ``download.max_total_bytes``);
``tarfile``'s ``data`` filter and ``zipfile``'s own name sanitising are a second layer.

The unpacked size is bounded twice: absolutely, and relative to the archive
(``download.max_expansion_ratio``). An absolute cap large enough for any real dataset (20 GiB)
would still let a 3 MB bomb fill 2 GiB of disk; photos barely compress (flower_photos unpacks to
1.02 times its .tgz), while a bomb of zeros expands about 1000 times.
"""

from __future__ import annotations

import os
import re
import stat
import tarfile
import zipfile
from pathlib import Path


def extract_archive(
    archive: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    max_files: int,
    max_total_bytes: int,
    max_expansion_ratio: float,
) -> None:
    """Extracts a tar (any compression) or zip archive after checking every member.

    Args:
        archive: the archive file.
        destination: the folder that receives its members.
        max_files: the most members accepted.
        max_total_bytes: the most bytes unpacked.
        max_expansion_ratio: the most bytes unpacked per byte of archive.

    Raises:
        ValueError: not a supported archive, damaged, or an unsafe member (named in the message);
            then nothing is kept.
    """
    archive, destination = Path(archive), Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(
                archive, destination, max_files=max_files, max_total_bytes=max_total_bytes, ratio=max_expansion_ratio
            )
            return
        try:
            handle = tarfile.open(archive, mode="r:*")
        except tarfile.ReadError:
            raise ValueError(
                f"{archive} is not a supported archive; use a .tgz, .tar.gz, .tar or .zip file, "
                "or a folder of class sub-folders"
            ) from None
        with handle:
            _extract_tar(
                handle,
                archive,
                destination,
                max_files=max_files,
                max_total_bytes=max_total_bytes,
                ratio=max_expansion_ratio,
            )
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, RuntimeError) as error:
        if isinstance(error, tarfile.FilterError):
            raise ValueError(f"refusing to extract {archive}: {error}") from None
        raise ValueError(
            f"cannot extract {archive}: {type(error).__name__}: {error}. If the archive is damaged or "
            "encrypted, download or pack it again"
        ) from None


def _extract_tar(
    handle: tarfile.TarFile, archive: Path, destination: Path, *, max_files: int, max_total_bytes: int, ratio: float
) -> None:
    members = handle.getmembers()
    for member in members:
        check_member_name(member.name, archive)
        _check_tar_member_type(member, archive)
    unpacked = sum(m.size for m in members if m.isfile())
    check_bounds(archive, len(members), unpacked, max_files, max_total_bytes)
    check_expansion(archive, unpacked, ratio)
    handle.extractall(destination, members=members, filter="data")


def _check_tar_member_type(member: tarfile.TarInfo, archive: Path) -> None:
    if member.issym() or member.islnk():
        kind = "a symbolic link" if member.issym() else "a hard link"
        _refuse(archive, member.name, f"is {kind} (to '{member.linkname}')")
    if member.isdev():
        _refuse(archive, member.name, "is a device file or FIFO")
    if not (member.isfile() or member.isdir()):
        _refuse(archive, member.name, f"has an unsupported type ({member.type!r})")


def _extract_zip(archive: Path, destination: Path, *, max_files: int, max_total_bytes: int, ratio: float) -> None:
    with zipfile.ZipFile(archive) as handle:
        members = handle.infolist()
        for member in members:
            check_member_name(member.filename, archive)
            _check_zip_member_type(member, archive)
        unpacked = sum(m.file_size for m in members)
        check_bounds(archive, len(members), unpacked, max_files, max_total_bytes)
        check_expansion(archive, unpacked, ratio)
        for member in members:
            handle.extract(member, destination)


def _check_zip_member_type(member: zipfile.ZipInfo, archive: Path) -> None:
    mode = member.external_attr >> 16  # Unix mode bits, when the zip was made on Unix
    if stat.S_ISLNK(mode):
        _refuse(archive, member.filename, "is a symbolic link")
    if mode and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        _refuse(archive, member.filename, "is a device file, FIFO or socket")


def check_member_name(name: str, archive: Path) -> None:
    """Refuses a member (or object key) named absolutely, with a '..' part, or holding a NUL.

    Raises:
        ValueError: naming ``archive`` (the archive or the s3:// source) and the member.
    """
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or re.match(r"^[A-Za-z]:", normalized):
        _refuse(archive, name, "has an absolute path")
    if ".." in normalized.split("/"):
        _refuse(archive, name, "has a '..' component (it would be written outside the target folder)")
    if "\x00" in name:
        _refuse(archive, name, "has a NUL character in its name")


def check_bounds(
    source: Path, count: int, total_bytes: int, max_files: int, max_total_bytes: int, verb: str = "extract"
) -> None:
    """Refuses ``source`` when ``count`` files or ``total_bytes`` exceed the download bounds.

    Raises:
        ValueError: naming the bound (``download.max_files`` or ``download.max_total_bytes``) to raise.
    """
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


def check_expansion(archive: Path, unpacked_bytes: int, max_expansion_ratio: float) -> None:
    """Refuses an archive that unpacks to more than ``max_expansion_ratio`` times its own size.

    Raises:
        ValueError: giving the ratio and naming ``download.max_expansion_ratio``.
    """
    archive_bytes = max(archive.stat().st_size, 1)
    if unpacked_bytes > max_expansion_ratio * archive_bytes:
        raise ValueError(
            f"refusing to extract {archive}: its {archive_bytes} bytes unpack to {unpacked_bytes} bytes, "
            f"{unpacked_bytes / archive_bytes:.0f} times as many, more than download.max_expansion_ratio="
            f"{max_expansion_ratio:g} (a decompression bomb, or data that compresses unusually well). Nothing was "
            "extracted; raise download.max_expansion_ratio if you trust this source"
        )


def _refuse(archive: Path, member: str, reason: str) -> None:
    raise ValueError(
        f"refusing to extract {archive}: member {member!r} {reason}. Nothing was extracted; the archive is "
        "unsafe or was not made for this tool. Use a trusted archive of class folders holding plain files"
    )
