"""The index of a dataset folder: one row per file under each class folder, and what each file is.

The dataset root is the folder whose visible sub-folders are the classes
(:func:`locate_dataset_root` descends through a single wrapping folder such as
``flower_photos/``). Files beside the class folders (``LICENSE.txt``) are kept but not indexed;
hidden entries and ``__MACOSX`` at the root are dropped. Every file under a class folder
(recursively) gets one row (:class:`transferlab.data.tables.IndexRow`) with a status: hidden
files (``.DS_Store``) and files in hidden folders are ``not-an-image``, links are ``link``, and
the others are checked with :func:`transferlab.data.images.inspect_image` in worker processes
(``ok``, ``corrupt``, ``not-an-image``, ``too-small``, ``too-large``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tqdm import tqdm

from transferlab.data import images, tables

LINK = "link"
EXCLUDED_STATUSES = (images.CORRUPT, images.NOT_AN_IMAGE, images.TOO_SMALL, images.TOO_LARGE, LINK)
IGNORED_ROOT_ENTRIES = frozenset({"__MACOSX"})
_HIDDEN_DETAIL = "hidden file or folder (name starts with '.'): not used as an image"


# --------------------------------------------------------------------------------------------
# The dataset layout


def locate_dataset_root(folder: str | os.PathLike) -> Path:
    """Finds the folder whose sub-folders are the classes.

    Descends while the folder holds nothing visible but one sub-folder that itself has
    sub-folders (``flower_photos/``), so a single class folder is never mistaken for a wrapper.
    """
    root = Path(folder)
    while True:
        entries = visible_entries(root)
        folders = [entry for entry in entries if is_real_dir(entry)]
        if len(entries) == 1 and len(folders) == 1 and any(is_real_dir(e) for e in visible_entries(folders[0])):
            root = folders[0]
        else:
            return root


def visible_entries(folder: Path) -> list[Path]:
    """The entries of ``folder`` that are part of a dataset: not hidden, not ``__MACOSX``; sorted."""
    return sorted(
        entry for entry in folder.iterdir() if not entry.name.startswith(".") and entry.name not in IGNORED_ROOT_ENTRIES
    )


def is_real_dir(path: Path) -> bool:
    """A folder that is not a symbolic link (links are never followed)."""
    return path.is_dir() and not path.is_symlink()


def class_folders(root: str | os.PathLike) -> list[Path]:
    """The class folders of a dataset root: its visible real sub-folders, sorted by name."""
    return [entry for entry in visible_entries(Path(root)) if is_real_dir(entry)]


def walk_files(folder: Path) -> Iterable[Path]:
    """Every file under ``folder``, recursively, folder by folder in name order; linked folders as entries."""
    for directory, subfolders, files in os.walk(folder):  # does not descend into linked folders
        here = Path(directory)
        yield from (here / name for name in sorted(files))
        yield from (here / name for name in sorted(subfolders) if (here / name).is_symlink())


def skipped_row(file: Path, relative: str) -> tables.IndexRow:
    """The index row of a class-folder entry that is not copied: a link, or a device, FIFO or socket."""
    label = relative.split("/")[0]
    if file.is_symlink():
        detail = f"symbolic link to {os.readlink(file)}: links are not followed; copy the file into the folder instead"
        return tables.IndexRow(relative, label, "", None, None, LINK, detail)
    detail = "not a regular file (device, FIFO or socket): not copied"
    return tables.IndexRow(relative, label, "", None, None, images.NOT_AN_IMAGE, detail)


# --------------------------------------------------------------------------------------------
# The index


def index_dataset(
    root: str | os.PathLike,
    *,
    min_image_side: int,
    max_image_pixels: int,
    max_files: int,
    workers: int = 2,
    extra_rows: Sequence[tables.IndexRow] = (),
) -> list[tables.IndexRow]:
    """One row per file under each class folder of ``root``, sorted by path.

    Raises:
        ValueError: ``root`` has no class folders, or more than ``max_files`` files.
    """
    root = Path(root)
    classes = class_folders(root)
    if not classes:
        found = ", ".join(entry.name for entry in visible_entries(root)[:10]) or "nothing"
        raise ValueError(
            f"no class folders found (found: {found}). The images must sit in one sub-folder per class, "
            "e.g. flower_photos/daisy/1.jpg and flower_photos/roses/2.jpg; put them in class folders"
        )
    relatives = [file.relative_to(root).as_posix() for folder in classes for file in walk_files(folder)]
    if len(relatives) > max_files:
        raise ValueError(f"{len(relatives)} files in the class folders, more than download.max_files={max_files}")
    checks = _check_files(
        root, relatives, min_image_side=min_image_side, max_image_pixels=max_image_pixels, workers=workers
    )
    rows = [_index_row(relative, check) for relative, check in zip(relatives, checks, strict=True)]
    return sorted([*rows, *extra_rows], key=lambda row: row.path)


def _index_row(relative: str, check: images.ImageCheck) -> tables.IndexRow:
    _require_utf8(relative)
    label = relative.split("/")[0]
    return tables.IndexRow(relative, label, check.sha256, check.width, check.height, check.status, check.detail)


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
    rows: Sequence[tables.IndexRow],
    *,
    min_images_per_class: int,
    classes: Iterable[str] = (),
    source: str = "the dataset",
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


def _describe_class(rows: Sequence[tables.IndexRow], label: str, usable: int) -> str:
    excluded = collections.Counter(row.status for row in rows if row.label == label and row.status != images.OK)
    reasons = ", ".join(f"{count} {status}" for status, count in sorted(excluded.items()))
    return f"class '{label}' has {usable} usable image(s)" + (f" (excluded: {reasons})" if reasons else "")
