"""The download stage: fetch the dataset, verify it, extract it safely, index it, report.

Each step has its own module: :mod:`transferlab.data.fetch` gets the source (URL, local archive,
local folder, or an ``s3://`` archive or prefix) and checks the archive's sha256,
:mod:`transferlab.data.archive` extracts it safely, :mod:`transferlab.data.index` finds the class
folders and checks every file. This module runs them in order into a folder the stage swaps in
only when everything passed, then writes the report, ``metrics/download.json`` (see docs/DESIGN.md).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transferlab.core import atomic
from transferlab.data import archive, fetch, images, index, tables

LOGGER = logging.getLogger(__name__)
# Lists in metrics/download.json stop here (the index has every row); counts are always complete.
MAX_LISTED = 100


@dataclasses.dataclass(frozen=True)
class DownloadResult:
    """What :func:`prepare_dataset` made: the index rows (sorted by path) and the report."""

    rows: list[tables.IndexRow]
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

    Returns:
        The index rows and the metrics report.

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
        rows = index.index_dataset(
            destination,
            extra_rows=skipped,
            min_image_side=min_image_side,
            max_image_pixels=max_image_pixels,
            max_files=max_files,
            workers=workers,
        )
    classes = [folder.name for folder in index.class_folders(destination)]
    index.check_classes(
        rows,
        min_images_per_class=min_images_per_class,
        classes=classes,
        source=source,
        min_image_side=min_image_side,
        max_image_pixels=max_image_pixels,
    )
    metrics = summarize(
        rows,
        source=source,
        archive_sha256=archive_sha256,
        source_fingerprint=source_fingerprint,
        seconds=time.perf_counter() - started,
    )
    return DownloadResult(rows=rows, metrics=metrics)


def move_dataset(root: Path, destination: Path) -> None:
    """Moves the visible entries of ``root`` (class folders, LICENSE.txt, ...) into ``destination``."""
    destination.mkdir(parents=True, exist_ok=True)
    for entry in index.visible_entries(root):
        os.replace(entry, destination / entry.name)


# --------------------------------------------------------------------------------------------
# The report


def summarize(
    rows: Sequence[tables.IndexRow],
    *,
    source: str,
    archive_sha256: str | None,
    seconds: float,
    source_fingerprint: str | None = None,
) -> dict[str, Any]:
    """The content of ``metrics/download.json`` (see docs/DESIGN.md).

    ``source_fingerprint`` is an ``s3://`` prefix's listing fingerprint (:func:`fetch.s3_fingerprint`),
    None for other sources: with it, a changed bucket changes this file even when every image index row
    stayed the same (the archive's sha256 plays that part for archives).
    """
    ok = [row for row in rows if row.status == images.OK]
    per_class = collections.Counter(row.label for row in ok)
    excluded = [row for row in rows if row.status != images.OK]
    by_content: dict[str, list[tables.IndexRow]] = collections.defaultdict(list)
    for row in ok:
        by_content[row.sha256].append(row)
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
        "images": len(ok),
        "classes": len(per_class),
        "images_per_class": dict(sorted(per_class.items())),
        "excluded": {status: sum(1 for row in excluded if row.status == status) for status in index.EXCLUDED_STATUSES},
        "excluded_files": [{"path": r.path, "status": r.status, "detail": r.detail} for r in excluded[:MAX_LISTED]],
        "duplicate_groups": len(groups),
        "duplicates": groups[:MAX_LISTED],
        "label_conflict_groups": len(conflicts),
        "label_conflicts": conflicts[:MAX_LISTED],
        "listed_at_most": MAX_LISTED,
        "seconds": round(seconds, 3),
    }


def describe(metrics: Mapping[str, Any]) -> str:
    """The stage's one log line: images per class, exclusions, duplicates, label conflicts, time."""
    per_class = ", ".join(f"{label} {count}" for label, count in metrics["images_per_class"].items())
    excluded = ", ".join(f"{count} {status}" for status, count in sorted(metrics["excluded"].items()) if count)
    return (
        f"{metrics['images']} images in {metrics['classes']} classes ({per_class}); excluded: {excluded or 'none'}; "
        f"{metrics['duplicate_groups']} duplicate group(s), {metrics['label_conflict_groups']} label conflict(s); "
        f"{metrics['seconds']:.1f} s"
    )
