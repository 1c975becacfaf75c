"""split stage: data/raw/index.csv -> data/splits/{train,val,test}.csv + metrics/split.json."""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

from transferlab.core import atomic, params, stage_runner
from transferlab.data import split


def read_index(path: Path) -> list[dict[str, str]]:
    """Reads the download stage's index; a missing file or column raises ``ValueError``."""
    if not path.is_file():
        raise ValueError(f"index {path} not found; run the download stage first (dvc repro download)")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = [column for column in split.REQUIRED_COLUMNS if column not in columns]
        if missing:
            raise ValueError(
                f"index {path} lacks column(s) {', '.join(missing)} (has: {', '.join(columns) or 'nothing'}); "
                "re-run the download stage to rebuild it"
            )
        return list(reader)


def write_splits(result: split.SplitResult, out: Path) -> None:
    """Writes train.csv, val.csv and test.csv into ``out``, all three or none."""
    with atomic.atomic_directory(out) as folder:
        for name, rows in result.splits().items():
            with (folder / f"{name}.csv").open("w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=split.SPLIT_COLUMNS, lineterminator="\n")
                writer.writeheader()
                writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--index", type=Path, required=True, help="the download stage's index.csv")
    parser.add_argument("--out", type=Path, required=True, help="folder for train.csv, val.csv, test.csv")
    parser.add_argument("--metrics", type=Path, required=True, help="split report (JSON)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    arguments = parser.parse_args()
    base = params.load_section("base", arguments.params)
    settings = params.load_section("split", arguments.params)
    result = split.split_index(
        read_index(arguments.index),
        val_fraction=settings.val_fraction,
        test_fraction=settings.test_fraction,
        seed=base.seed,
        max_images_per_class=settings.max_images_per_class,
    )
    write_splits(result, arguments.out)
    atomic.write_json(arguments.metrics, result.report)
    totals, dropped = result.report["totals"], result.report["dropped"]
    logging.info(
        "train %d, val %d, test %d images in %d classes; dropped: %d label conflict(s), %d over cap, %s not ok",
        totals["train"], totals["val"], totals["test"], len(result.report["classes"]),
        dropped["label_conflict"], dropped["over_cap"], sum(dropped["not_ok"].values()),
    )


if __name__ == "__main__":
    stage_runner.run_stage("split", main)
