"""The download stage: fetch the dataset, verify it, extract it safely, index it, report.

Each step has its own module: :mod:`transferlab.data.fetch` gets the source (URL, local archive,
local folder, or an ``s3://`` archive or prefix) and checks the archive's sha256,
:mod:`transferlab.data.archive` extracts it safely, :mod:`transferlab.data.index` finds the class
folders and checks every file. This module runs them in order into a folder the stage swaps in
only when everything passed, then writes the report, ``metrics/download.json`` (see docs/DESIGN.md).

Memory: given the index's path, :func:`prepare_dataset` streams the rows from the file checks into
the CSV (:func:`transferlab.data.index.index_rows`) and keeps per row only a 64-bit hash of its
sha256 (:class:`IndexSummary`), then reads the written index once more for the paths of the
duplicate and conflicting images the report lists: 8 bytes per image instead of the rows.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.core import atomic
from transferlab.data import archive, fetch, images, index, tables

LOGGER = logging.getLogger(__name__)
# Lists in metrics/download.json stop here (the index has every row); counts are always complete.
MAX_LISTED = 100


@dataclasses.dataclass(frozen=True)
class DownloadResult:
    """What :func:`prepare_dataset` made: the index rows (sorted by path; None when streamed to a file), the report."""

    rows: list[tables.IndexRow] | None
    metrics: dict[str, Any]


def prepare_dataset(
    *,
    source: str,
    sha256: str,
    destination: str | os.PathLike,
    min_image_side: int,
    min_images_per_class: int,
    max_files: int,
    max_total_bytes: int,
    max_expansion_ratio: float,
    max_image_pixels: int,
    retries: int,
    deadline_seconds: float,
    workers: int = 2,
    root: str | os.PathLike | None = None,
    backoff_seconds: float = 1.0,
    index_path: str | os.PathLike | None = None,
) -> DownloadResult:
    """Fetches, verifies, extracts and indexes a dataset into ``destination``.

    ``destination`` should be an empty temporary folder (the stage swaps it in for
    ``data/raw/images`` only when this returns); working files go into a temporary folder beside
    it and are removed whatever happens.

    Args:
        source: URL, local archive, local folder, ``s3://`` archive object or prefix (see :mod:`fetch`).
        sha256: the archive's expected sha256; may be empty only for a folder (local or an s3:// prefix).
        destination: folder that receives the class folders.
        min_image_side: shorter side below this makes an image ``too-small``.
        min_images_per_class: a class with fewer usable images stops the stage.
        max_files: most archive members / folder files accepted.
        max_total_bytes: most bytes downloaded, and most unpacked / copied.
        max_expansion_ratio: most bytes unpacked per byte of archive.
        max_image_pixels: larger images are ``too-large`` (decompression bombs).
        retries: how often a broken download is retried.
        deadline_seconds: the whole download (every attempt and wait) ends by then.
        workers: processes that check images.
        root: the folder relative local paths are resolved against (default: the repository root).
        backoff_seconds: first wait before a retry; it doubles each time.
        index_path: where to write the index as its rows are made (streamed, not held; the
            result's ``rows`` is then None). It is written before the class counts are checked:
            pass a temporary path that is dropped on an error (the stage's ``atomic_path``).
            None: the rows are listed in the result.

    Returns:
        The index rows (or None) and the metrics report.

    Raises:
        ValueError: unreachable source, a download too large or too slow, a folder source that
            contains ``destination``, checksum mismatch, unsafe or damaged archive, no class
            folders, fewer than two classes with usable images, a class with too few images.
    """
    started = time.perf_counter()
    destination = Path(destination)
    kind, location = fetch.resolve_source(source, root=root)
    # Named after its owner, so that the next run removes it if this process is killed (core.atomic).
    with atomic.temporary_directory(destination.parent, "download") as work:
        skipped: list[tables.IndexRow] = []
        archive_sha256 = source_fingerprint = None
        if kind == "s3":  # an archive object, or a prefix staged in the scratch folder
            fetched = fetch.fetch_s3(location, work, max_files=max_files, max_total_bytes=max_total_bytes)
            kind, location, source_fingerprint = fetched.kind, fetched.path, fetched.fingerprint
        if kind == "staged":  # an s3:// prefix, already listed, bounded and name-checked: as if extracted
            if sha256:
                LOGGER.info("download.sha256 is not used for an s3:// prefix (%s)", source)
            move_dataset(index.locate_dataset_root(location), destination)
        elif kind == "folder":
            if sha256:
                LOGGER.info("download.sha256 is not used for a local folder source (%s)", location)
            skipped = fetch.copy_folder(
                location, destination, max_files=max_files, max_total_bytes=max_total_bytes, name=source
            )
        else:
            archive_path = location
            if kind == "url":
                archive_path = Path(work) / "archive.part"
                fetch.download_url(
                    location,
                    archive_path,
                    retries=retries,
                    max_bytes=max_total_bytes,
                    deadline_seconds=deadline_seconds,
                    backoff_seconds=backoff_seconds,
                )
            archive_sha256 = fetch.verify_sha256(archive_path, expected=sha256, source=source)
            extracted = Path(work) / "extracted"
            archive.extract_archive(
                archive_path,
                extracted,
                max_files=max_files,
                max_total_bytes=max_total_bytes,
                max_expansion_ratio=max_expansion_ratio,
            )
            move_dataset(index.locate_dataset_root(extracted), destination)
        made = index.index_rows(
            destination,
            extra_rows=skipped,
            min_image_side=min_image_side,
            max_image_pixels=max_image_pixels,
            max_files=max_files,
            workers=workers,
        )
        summary = IndexSummary()
        if index_path is None:
            rows: list[tables.IndexRow] | None = list(summary.count(made))
        else:
            tables.write_index(summary.count(made), index_path)
            rows = None
    classes = [folder.name for folder in index.class_folders(destination)]
    index.check_classes(
        summary.classes,
        min_images_per_class=min_images_per_class,
        classes=classes,
        source=source,
        min_image_side=min_image_side,
        max_image_pixels=max_image_pixels,
    )
    metrics = summary.report(
        rows if rows is not None else _index_columns(index_path),
        source=source,
        archive_sha256=archive_sha256,
        source_fingerprint=source_fingerprint,
        seconds=time.perf_counter() - started,
    )
    return DownloadResult(rows=rows, metrics=metrics)


def _index_columns(path: str | os.PathLike) -> Iterator[tables.IndexRow]:
    """The written index read back, one row at a time, with the columns the report needs."""
    for row in tables.stream_index(path):
        yield tables.IndexRow(row["path"], row["label"], row["sha256"], None, None, row["status"], "")


def move_dataset(root: Path, destination: Path) -> None:
    """Moves the visible entries of ``root`` (class folders, LICENSE.txt, ...) into ``destination``."""
    destination.mkdir(parents=True, exist_ok=True)
    for entry in index.visible_entries(root):
        os.replace(entry, destination / entry.name)


# --------------------------------------------------------------------------------------------
# The report


def summarize(
    rows: Iterable[tables.IndexRow],
    *,
    source: str,
    archive_sha256: str | None,
    seconds: float,
    source_fingerprint: str | None = None,
) -> dict[str, Any]:
    """The content of ``metrics/download.json`` (see docs/DESIGN.md), from rows in path order.

    ``rows`` is read twice (a list, or another re-iterable). ``source_fingerprint`` is an
    ``s3://`` prefix's listing fingerprint (:func:`fetch.s3_fingerprint`), None for other
    sources: with it, a changed bucket changes this file even when every image index row stayed
    the same (the archive's sha256 plays that part for archives).
    """
    summary = IndexSummary()
    for _ in summary.count(rows):
        pass
    return summary.report(
        rows, source=source, archive_sha256=archive_sha256, seconds=seconds, source_fingerprint=source_fingerprint
    )


class IndexSummary:
    """The report's counts, gathered while the index rows stream past; 8 bytes per usable image.

    Per row it counts classes and statuses (:class:`transferlab.data.index.ClassCounts`), keeps
    the first :data:`MAX_LISTED` excluded files, and for each ``ok`` row a 64-bit hash of its
    sha256. Byte-identical files share that hash, so the hashes seen twice or more name every
    candidate duplicate; :meth:`report` reads the rows once more for those candidates' paths and
    groups them by their full sha256 (a hash collision only adds a candidate, never a group).
    """

    def __init__(self) -> None:
        self.classes = index.ClassCounts()
        self.excluded: collections.Counter[str] = collections.Counter()
        self.excluded_files: list[dict[str, str]] = []
        self.hashes = array.array("q")

    def count(self, rows: Iterable[tables.IndexRow]) -> Iterator[tables.IndexRow]:
        """Yields ``rows`` unchanged, counting each one as it passes."""
        for row in rows:
            self.classes.add(row)
            if row.status == images.OK:
                self.hashes.append(hash(row.sha256))
            else:
                self.excluded[row.status] += 1
                if len(self.excluded_files) < MAX_LISTED:
                    self.excluded_files.append({"path": row.path, "status": row.status, "detail": row.detail})
            yield row

    def report(
        self,
        rows: Iterable[tables.IndexRow],
        *,
        source: str,
        archive_sha256: str | None,
        seconds: float,
        source_fingerprint: str | None = None,
    ) -> dict[str, Any]:
        """The content of ``metrics/download.json``; ``rows``: the counted rows again, in the same order."""
        per_class = self.classes.usable
        by_content = self._candidates(rows)
        groups = sorted(sorted(r.path for r in group) for group in by_content.values() if len(group) > 1)
        conflicts = [
            {"sha256": digest, "labels": sorted({r.label for r in group}), "paths": sorted(r.path for r in group)}
            for digest, group in sorted(by_content.items())
            if len({r.label for r in group}) > 1
        ]
        return {
            "source": source,
            "archive_sha256": archive_sha256,
            "source_fingerprint": source_fingerprint,
            "images": per_class.total(),
            "classes": len(+per_class),
            "images_per_class": dict(sorted((+per_class).items())),
            "excluded": {status: self.excluded[status] for status in index.EXCLUDED_STATUSES},
            "excluded_files": self.excluded_files,
            "duplicate_groups": len(groups),
            "duplicates": groups[:MAX_LISTED],
            "label_conflict_groups": len(conflicts),
            "label_conflicts": conflicts[:MAX_LISTED],
            "listed_at_most": MAX_LISTED,
            "seconds": round(seconds, 3),
        }

    def _candidates(self, rows: Iterable[tables.IndexRow]) -> dict[str, list[tables.IndexRow]]:
        """The ``ok`` rows whose sha256 hash was seen twice or more, by sha256."""
        hashes = np.frombuffer(self.hashes, dtype=np.int64)
        hashes.sort()  # in place: the order of the rows is not needed, and a copy would double the bytes
        repeated = set(hashes[1:][hashes[1:] == hashes[:-1]].tolist())
        by_content: dict[str, list[tables.IndexRow]] = collections.defaultdict(list)
        if repeated:
            for row in rows:
                if row.status == images.OK and hash(row.sha256) in repeated:
                    by_content[row.sha256].append(row)
        return by_content


def describe(metrics: Mapping[str, Any]) -> str:
    """The stage's one log line: images per class, exclusions, duplicates, label conflicts, time."""
    per_class = ", ".join(f"{label} {count}" for label, count in metrics["images_per_class"].items())
    excluded = ", ".join(f"{count} {status}" for status, count in sorted(metrics["excluded"].items()) if count)
    return (
        f"{metrics['images']} images in {metrics['classes']} classes ({per_class}); excluded: {excluded or 'none'}; "
        f"{metrics['duplicate_groups']} duplicate group(s), {metrics['label_conflict_groups']} label conflict(s); "
        f"{metrics['seconds']:.1f} s"
    )
