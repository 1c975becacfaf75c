"""download stage: download.source -> data/raw/images/, data/raw/index.csv + metrics/download.json."""

from __future__ import annotations

import argparse
import collections
import logging
from pathlib import Path

from transferlab.core import atomic, params, stage_runner
from transferlab.data import download


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=Path, required=True, help="folder that receives the class folders")
    parser.add_argument("--index", type=Path, required=True, help="index of every file (CSV)")
    parser.add_argument("--metrics", type=Path, required=True, help="download report (JSON)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    arguments = parser.parse_args()
    params.load_section("base", arguments.params)  # validated with the rest, though nothing here is random
    settings = params.load_section("download", arguments.params)
    # Both outputs are swapped in only after every check passed; on an error both stay as they were.
    with atomic.atomic_path(arguments.index) as index, atomic.atomic_directory(arguments.images) as images:
        result = download.prepare_dataset(
            source=settings.source,
            sha256=settings.sha256,
            destination=images,
            min_image_side=settings.min_image_side,
            min_images_per_class=settings.min_images_per_class,
            max_files=settings.max_files,
            max_total_bytes=settings.max_total_bytes,
            max_image_pixels=settings.max_image_pixels,
            retries=settings.retries,
        )
        download.write_index(result.rows, index)
    atomic.write_json(arguments.metrics, result.metrics)
    metrics = result.metrics
    excluded = collections.Counter({status: n for status, n in metrics["excluded"].items() if n})
    logging.info(
        "%d images in %d classes (%s); excluded: %s; %d duplicate group(s), %d label conflict(s); %.1f s",
        metrics["images"], metrics["classes"],
        ", ".join(f"{label} {n}" for label, n in metrics["images_per_class"].items()),
        ", ".join(f"{n} {status}" for status, n in sorted(excluded.items())) or "none",
        metrics["duplicate_groups"], metrics["label_conflict_groups"], metrics["seconds"],
    )


if __name__ == "__main__":
    stage_runner.run_stage("download", main)
