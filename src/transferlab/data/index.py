"""The index of a dataset folder: one row per file under each class folder, and what each file is.

The dataset root is the folder whose visible sub-folders are the classes
(:func:`locate_dataset_root` descends through a single wrapping folder such as
``flower_photos/``). Files beside the class folders (``LICENSE.txt``) are kept but not indexed;
hidden entries and ``__MACOSX`` at the root are dropped. Every file under a class folder
(recursively) gets one row (:class:`transferlab.data.tables.IndexRow`) with a status: hidden
files (``.DS_Store``) and files in hidden folders are ``not-an-image``, links are ``link``, and
the others are checked with :func:`transferlab.data.images.inspect_image` in worker processes
(``ok``, ``corrupt``, ``not-an-image``, ``too-small``, ``too-large``); files with unusable names
are ``bad-name`` (below).

Names, one rule for every stage: a class folder name becomes a label in the index, the splits,
the features files and the exported ``labels.txt``, and is printed by every stage, so the
download stage refuses (with one message naming each folder, escaped) a class folder whose
name is not valid UTF-8, holds control characters (newline, tab, terminal escape codes) or
line separators, or starts or ends with whitespace; the user renames it. A *file* whose path
below its class folder is not valid UTF-8 or holds control characters is excluded with status
``bad-name`` (its index path escaped as ``\\xNN``), the rest of the dataset still downloads.
No stage strips or otherwise normalizes names after this, and messages print names with
:func:`printable` so no escape code reaches a terminal.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import heapq
import itertools
import os
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from transferlab.data import images, tables

LINK = "link"
BAD_NAME = "bad-name"
EXCLUDED_STATUSES = (images.CORRUPT, images.NOT_AN_IMAGE, images.TOO_SMALL, images.TOO_LARGE, LINK, BAD_NAME)
# The param that decides each exclusion, for messages that tell the user what to change.
STATUS_PARAMS = {images.TOO_SMALL: "download.min_image_side", images.TOO_LARGE: "download.max_image_pixels"}
# Characters a name may not hold: C0/C1 controls (newline, tab, ESC of terminal escape codes),
# line and paragraph separators (they split labels.txt lines), and the surrogates by which
# Python carries the bytes of a name that is not valid UTF-8.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Zl", "Zp", "Cs"})
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
# Names


def name_problem(name: str, *, whole: bool = True) -> str | None:
    """What makes ``name`` unusable as a class or file name, or ``None`` when it is fine.

    Args:
        name: a folder or file name (or a relative path), as the file system gave it.
        whole: also refuse leading or trailing whitespace (class names, which become labels).
    """
    if name.isprintable():  # the common case, in C: no control character, separator or stray byte
        return "starts or ends with whitespace" if whole and name != name.strip() else None
    categories = {unicodedata.category(character) for character in name}
    if "Cs" in categories:
        return "is not valid UTF-8"
    if categories & _FORBIDDEN_CATEGORIES:
        return "holds control characters (newline, tab, terminal escape codes) or line separators"
    if whole and name != name.strip():
        return "starts or ends with whitespace"
    return None


def printable(text: str) -> str:
    """``text`` with everything a terminal could act on escaped, like ``repr`` without the quotes.

    Bytes of a name that is not valid UTF-8 show as ``\\xNN``, control and other invisible
    characters as ``\\xNN``/``\\uNNNN``, a backslash as ``\\\\``; ordinary text is unchanged.
    """
    return "".join(_printable_character(character) for character in text)


def _printable_character(character: str) -> str:
    code = ord(character)
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: one undecodable byte of the name
        return f"\\x{code - 0xDC00:02x}"
    if character == "\\":
        return "\\\\"
    if character.isprintable():
        return character
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def check_class_names(classes: Sequence[Path]) -> None:
    """Refuses class folders whose names later stages cannot carry (see the module docstring).

    Raises:
        ValueError: naming every such folder (escaped) and why, and what to do.
    """
    refused = [(folder.name, problem) for folder in classes if (problem := name_problem(folder.name))]
    if refused:
        described = ", ".join(f"'{printable(name)}' ({problem})" for name, problem in refused[:10])
        more = f" and {len(refused) - 10} more" if len(refused) > 10 else ""
        raise ValueError(
            f"class folder name(s) that later stages cannot use: {described}{more}. A class folder's name becomes "
            "its label in the index, the splits and the exported labels.txt; rename the folder(s) (UTF-8, no "
            "control characters, no spaces at either end) and run download again"
        )


def _bad_name_row(relative: str, problem: str) -> tables.IndexRow:
    detail = f"the file name {problem}: not used; rename the file to include it"
    return tables.IndexRow(printable(relative), relative.split("/")[0], "", None, None, BAD_NAME, detail)


def _escaped_row(row: tables.IndexRow) -> tables.IndexRow:
    # A link or special file from a folder source: its name or link target may hold the same
    # characters; the index (a UTF-8 CSV) gets them escaped, the status stays what it was.
    if name_problem(row.path, whole=False) is None and name_problem(row.detail, whole=False) is None:
        return row
    return tables.IndexRow(
        printable(row.path), row.label, row.sha256, row.width, row.height, row.status, printable(row.detail)
    )


# --------------------------------------------------------------------------------------------
# The index


def index_rows(
    root: str | os.PathLike,
    *,
    min_image_side: int,
    max_image_pixels: int,
    max_files: int,
    workers: int = 2,
    extra_rows: Sequence[tables.IndexRow] = (),
) -> Iterator[tables.IndexRow]:
    """One row per file under each class folder of ``root``, sorted by path, made as they are read.

    The folders are walked in path order (:func:`files_in_path_order`) and the files checked in
    worker processes a few chunks ahead of the reader, so the rows come out sorted without being
    held: writing them to the index holds a few hundred rows, however many files there are. Only
    the rows that sort elsewhere than their file are held and merged in: files with unusable names
    (their path is escaped) and ``extra_rows``.

    The layout is checked now (this call raises); the files are checked as the rows are read.

    Args:
        root: the dataset root (its visible sub-folders are the classes).
        min_image_side: shorter side below this makes an image ``too-small``.
        max_image_pixels: larger images are ``too-large``.
        max_files: most files accepted under the class folders.
        workers: processes that check images (1 = in this process).
        extra_rows: rows for entries the copy skipped (links, special files); escaped, merged in.

    Raises:
        ValueError: ``root`` has no class folders, a class folder name later stages cannot use
            (:func:`check_class_names`), or more than ``max_files`` files.
    """
    root = Path(root)
    classes = class_folders(root)
    if not classes:
        found = ", ".join(printable(entry.name) for entry in visible_entries(root)[:10]) or "nothing"
        raise ValueError(
            f"no class folders found (found: {found}). The images must sit in one sub-folder per class, "
            "e.g. flower_photos/daisy/1.jpg and flower_photos/roses/2.jpg; put them in class folders"
        )
    check_class_names(classes)
    count, elsewhere = 0, []
    for relative in files_in_path_order(classes):  # a first walk counts (nothing is checked beyond the bound)
        count += 1
        if (problem := name_problem(relative, whole=False)) is not None:
            elsewhere.append(_bad_name_row(relative, problem))
    if count > max_files:
        raise ValueError(f"{count} files in the class folders, more than download.max_files={max_files}")
    named = (relative for relative in files_in_path_order(classes) if name_problem(relative, whole=False) is None)
    checked = _check_files(
        root,
        named,
        total=count - len(elsewhere),
        min_image_side=min_image_side,
        max_image_pixels=max_image_pixels,
        workers=workers,
    )
    rows = (_index_row(relative, check) for relative, check in checked)
    elsewhere += [_escaped_row(row) for row in extra_rows]
    # Stable, as the one sort it replaces: at equal paths, checked rows, then bad names, then extra rows.
    return heapq.merge(rows, sorted(elsewhere, key=_row_path), key=_row_path)


def _row_path(row: tables.IndexRow) -> str:
    return row.path


def files_in_path_order(classes: Iterable[Path]) -> Iterator[str]:
    """The relative POSIX paths of every file :func:`walk_files` finds under ``classes``, sorted as strings.

    Each folder is listed once and its entries sorted so that a sub-folder ``a`` sorts as
    ``a/`` (its files' paths all start so): the paths come out in the order ``sorted`` gives,
    holding one folder's names at a time.
    """
    for folder in sorted(classes, key=lambda folder: folder.name + "/"):
        yield from _walk_in_path_order(folder, folder.name)


def _walk_in_path_order(folder: Path, relative: str) -> Iterator[str]:
    files, folders = [], []  # names only: a folder of 10^6 files holds ~70 MB while it is walked
    try:
        with os.scandir(folder) as listing:
            for entry in listing:
                try:  # as os.walk: a folder is walked into unless it is a link (a linked folder is an entry)
                    walked = entry.is_dir() and not entry.is_symlink()
                except OSError:
                    walked = False
                (folders if walked else files).append(entry.name)
    except OSError:  # as os.walk: a folder that cannot be listed is skipped
        return
    files.sort()
    for key in heapq.merge(files, sorted(name + "/" for name in folders)):  # no name holds "/": keys differ
        if key.endswith("/"):
            yield from _walk_in_path_order(folder / key[:-1], f"{relative}/{key[:-1]}")
        else:
            yield f"{relative}/{key}"


def _index_row(relative: str, check: images.ImageCheck) -> tables.IndexRow:
    label = relative.split("/")[0]
    return tables.IndexRow(relative, label, check.sha256, check.width, check.height, check.status, check.detail)


def _check_files(
    root: Path,
    relatives: Iterable[str],
    *,
    total: int,
    min_image_side: int,
    max_image_pixels: int,
    workers: int,
) -> Iterator[tuple[str, images.ImageCheck]]:
    """Each of ``relatives`` with its check, in order; workers run at most a few chunks ahead of the reader."""
    check = functools.partial(_check_file, str(root), min_image_side=min_image_side, max_image_pixels=max_image_pixels)
    progress = functools.partial(tqdm, total=total, desc="check images", unit="file", disable=None, mininterval=0.5)
    if workers <= 1 or total < 2:
        yield from progress((relative, check(relative)) for relative in relatives)
        return
    chunksize = max(1, min(64, total // (workers * 8)))
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        yield from progress(_ordered_map(pool, check, relatives, chunksize=chunksize, ahead=4 * workers))


def _ordered_map(
    pool: concurrent.futures.Executor,
    function: Callable[[str], Any],
    items: Iterable[str],
    *,
    chunksize: int,
    ahead: int,
) -> Iterator[tuple[str, Any]]:
    """``(item, function(item))`` in order, ``chunksize`` items per task, at most ``ahead`` tasks submitted.

    ``Executor.map`` submits every task at once (it reads its whole input first); this reads
    ``items`` only as the results are taken.
    """
    pending: collections.deque[tuple[list[str], concurrent.futures.Future]] = collections.deque()
    items = iter(items)
    while chunk := list(itertools.islice(items, chunksize)):
        pending.append((chunk, pool.submit(_map_chunk, function, chunk)))
        if len(pending) >= ahead:
            done, future = pending.popleft()
            yield from zip(done, future.result(), strict=True)
    while pending:
        done, future = pending.popleft()
        yield from zip(done, future.result(), strict=True)


def _map_chunk(function: Callable[[str], Any], chunk: list[str]) -> list[Any]:
    return [function(item) for item in chunk]


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


class ClassCounts:
    """Per class, its usable (``ok``) images and its excluded files by status: what :func:`check_classes` needs.

    Fed one row at a time (:meth:`add`), so a stream of index rows is checked without holding it.
    """

    def __init__(self) -> None:
        self.usable: collections.Counter[str] = collections.Counter()
        self.excluded: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.labels: set[str] = set()

    def add(self, row: tables.IndexRow) -> None:
        """Counts one index row."""
        self.labels.add(row.label)
        if row.status == images.OK:
            self.usable[row.label] += 1
        else:
            self.excluded[row.label][row.status] += 1


def check_classes(
    rows: Iterable[tables.IndexRow] | ClassCounts,
    *,
    min_images_per_class: int,
    classes: Iterable[str] = (),
    source: str = "the dataset",
    min_image_side: int | None = None,
    max_image_pixels: int | None = None,
) -> None:
    """Stops a dataset that cannot be split: under two usable classes, or a class too small.

    The message names, per class, its usable images and why the others were excluded (most
    frequent reason first), and for the most frequent reason what decides it: a 28x28 dataset
    refused as ``too-small`` names ``download.min_image_side`` and its value.

    Args:
        rows: the index rows, or their :class:`ClassCounts` (gathered while the rows were written).
        min_images_per_class: least number of ``ok`` images a class needs.
        classes: class folder names, so that an empty class folder counts too.
        source: what to call the dataset in messages.
        min_image_side: the value of ``download.min_image_side``, quoted in the advice.
        max_image_pixels: the value of ``download.max_image_pixels``, quoted in the advice.

    Raises:
        ValueError: naming the classes, their usable counts, their exclusions and what to change.
    """
    counts = rows if isinstance(rows, ClassCounts) else ClassCounts()
    if counts is not rows:
        for row in rows:
            counts.add(row)
    usable, excluded = counts.usable, counts.excluded
    labels = sorted(counts.labels | set(classes))
    limits = {images.TOO_SMALL: min_image_side, images.TOO_LARGE: max_image_pixels}
    if sum(1 for label in labels if usable[label]) < 2:
        found = "; ".join(_class_counts(label, usable[label], excluded[label]) for label in labels[:MAX_CLASSES_LISTED])
        more = f" and {len(labels) - MAX_CLASSES_LISTED} more" if len(labels) > MAX_CLASSES_LISTED else ""
        raise ValueError(
            f"{printable(source)} has fewer than 2 classes with usable images. Usable images per class folder: "
            f"{found or 'no class folders'}{more}.{_advice(excluded.values(), limits)} A classifier needs at least "
            "2 class folders, each holding its images: <root>/<class>/<image>"
        )
    small = [label for label in labels if usable[label] < min_images_per_class]
    if small:
        described = "; ".join(_describe_class(label, usable[label], excluded[label]) for label in small)
        advice = _advice([excluded[label] for label in small], limits)
        raise ValueError(
            f"too few usable images to split: {described}.{advice} Each class needs at least "
            f"download.min_images_per_class={min_images_per_class}; add images, remove the class folder, "
            "or lower download.min_images_per_class"
        )


MAX_CLASSES_LISTED = 20
# Why files of each status were excluded and what to do; {param} and {value} name the setting.
_ADVICE = {
    images.TOO_SMALL: "their shorter side is below {param}{value}; lower {param} to use them "
    "(backbones upscale small images anyway)",
    images.TOO_LARGE: "they have more pixels than {param}{value}; raise {param} if they are genuine",
    images.CORRUPT: "the files are damaged or truncated; replace them",
    images.NOT_AN_IMAGE: "they are not images Pillow can read, or are hidden files",
    LINK: "symbolic links are not followed; copy the files into the class folders",
    BAD_NAME: "their names are not valid UTF-8 or hold control characters; rename them",
}


def _by_count(excluded: collections.Counter[str]) -> list[tuple[str, int]]:
    return sorted(excluded.items(), key=lambda item: (-item[1], item[0]))


def _class_counts(label: str, usable: int, excluded: collections.Counter[str]) -> str:
    reasons = ", ".join(f"{count} {status}" for status, count in _by_count(excluded))
    return f"{printable(label)}: {usable}" + (f" (excluded: {reasons})" if reasons else "")


def _describe_class(label: str, usable: int, excluded: collections.Counter[str]) -> str:
    reasons = ", ".join(f"{count} {status}" for status, count in _by_count(excluded))
    return f"class '{printable(label)}' has {usable} usable image(s)" + (f" (excluded: {reasons})" if reasons else "")


def _advice(counters: Iterable[collections.Counter[str]], limits: dict[str, int | None]) -> str:
    """ " Most excluded files (N of M) are <status>: <why and what to do>." or "" when none were excluded."""
    total: collections.Counter[str] = collections.Counter()
    for counter in counters:
        total.update(counter)
    if not total:
        return ""
    status, count = _by_count(total)[0]
    param = STATUS_PARAMS.get(status, "")
    value = "" if limits.get(status) is None else f"={limits[status]}"
    advice = _ADVICE.get(status, "see the detail column of the index").format(param=param, value=value)
    return f" Most excluded files ({count} of {total.total()}) are {status}: {advice}."
